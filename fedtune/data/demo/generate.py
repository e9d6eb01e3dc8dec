"""Generate the synthetic clinical dosage-arithmetic demo dataset (train.jsonl and test.jsonl).

Every row is an invented question about dosage arithmetic with a short, templated answer that
shows the formula and the exact result. The rows are split over five hospital "sites" with a
skewed (non-IID) task mix, site-specific number ranges and different sizes, so the dataset can
drive a small federated fine-tuning demo.

All drug names and numbers are made up. This is NOT medical advice.

Usage:
    python fedtune/data/demo/generate.py [--seed 2024] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

DEFAULT_SEED = 2024
TEST_ROWS_PER_SITE = 20
MAX_ATTEMPTS = 20_000
ONE_DECIMAL = Decimal("0.1")

# Invented drug names; none of them is a real medicine.
DRUGS = (
    "Zentrafen",
    "Quorvalin",
    "Brelixatine",
    "Tovimarin",
    "Velquodex",
    "Pallivorin",
    "Vostradine",
    "Marquelin",
    "Ostrafenol",
    "Lumexadol",
    "Ferivance",
    "Draxomelin",
    "Solvatrex",
    "Kyrelozin",
    "Ambrotase",
    "Zelquinor",
    "Travoprenix",
    "Helicarbin",
    "Norquavel",
    "Yzamitrol",
)

TASKS = (
    "weight_dose",
    "infusion_rate",
    "tablet_count",
    "unit_conversion",
    "drip_rate",
    "pediatric_split",
)

TABLETS_PER_DOSE = ("0.5", "1", "1.5", "2", "2.5", "3", "4")
DROP_FACTORS = ("10", "15", "20", "60")  # gtt/mL of common giving sets
DOSES_PER_DAY = (2, 3, 4, 6)
# (from unit, to unit, multiply by 1000?) for unit_conversion.
CONVERSIONS = (("g", "mg", True), ("mg", "g", False), ("mg", "mcg", True), ("mcg", "mg", False))

Row = dict[str, str]


@dataclass(frozen=True)
class Grid:
    """Evenly spaced numbers from `low` to `high` inclusive, `step` apart (decimal strings)."""

    low: str
    high: str
    step: str

    def draw(self, rng: random.Random) -> Decimal:
        """Draw one value on the grid."""
        low, high, step = Decimal(self.low), Decimal(self.high), Decimal(self.step)
        return low + step * rng.randint(0, int((high - low) / step))


@dataclass(frozen=True)
class Site:
    """One hospital: its size, task mix and the number ranges it draws from."""

    name: str
    train_rows: int
    task_mix: dict[str, float]  # relative share of each task; tasks left out never occur
    weight_kg: Grid  # patient weights for weight_dose
    child_weight_kg: Grid  # child weights for pediatric_split
    mg_per_kg: tuple[str, ...]  # single-dose strengths for weight_dose
    mg_per_kg_day: tuple[str, ...]  # daily strengths for pediatric_split
    volumes_ml: tuple[str, ...]  # bag volumes for infusion_rate and drip_rate
    hours: tuple[str, ...]  # durations for infusion_rate and drip_rate
    tablet_mg: tuple[str, ...]  # tablet strengths for tablet_count


SITES = (
    Site(  # general adult ward: mostly weight-based doses and tablets
        name="site-a",
        train_rows=120,
        task_mix={
            "weight_dose": 0.5,
            "tablet_count": 0.25,
            "unit_conversion": 0.1,
            "infusion_rate": 0.1,
            "pediatric_split": 0.05,
        },
        weight_kg=Grid("50", "110", "1"),
        child_weight_kg=Grid("12", "40", "1"),
        mg_per_kg=("1", "2", "2.5", "3", "4", "5", "6", "8", "10"),
        mg_per_kg_day=("10", "20", "30", "40"),
        volumes_ml=("100", "250", "500", "1000"),
        hours=("1", "2", "4", "5", "8"),
        tablet_mg=("25", "50", "100", "200", "250", "500"),
    ),
    Site(  # intensive care unit: mostly infusion pumps
        name="site-b",
        train_rows=160,
        task_mix={
            "infusion_rate": 0.55,
            "drip_rate": 0.2,
            "weight_dose": 0.15,
            "unit_conversion": 0.1,
        },
        weight_kg=Grid("60", "140", "1"),
        child_weight_kg=Grid("10", "40", "1"),
        mg_per_kg=("0.5", "1", "1.5", "2", "3", "5"),
        mg_per_kg_day=("10", "20"),
        volumes_ml=("50", "100", "250", "500", "750", "1000", "1500", "2000"),
        hours=("1", "2", "3", "4", "6", "8", "12", "24"),
        tablet_mg=("10", "20", "40", "80"),
    ),
    Site(  # hospital pharmacy: mostly unit conversions and tablet counts
        name="site-c",
        train_rows=200,
        task_mix={
            "unit_conversion": 0.5,
            "tablet_count": 0.3,
            "weight_dose": 0.1,
            "infusion_rate": 0.05,
            "drip_rate": 0.05,
        },
        weight_kg=Grid("45", "95", "1"),
        child_weight_kg=Grid("10", "40", "1"),
        mg_per_kg=("2", "5", "7.5", "10", "15"),
        mg_per_kg_day=("15", "30"),
        volumes_ml=("100", "250", "500"),
        hours=("1", "2", "4"),
        tablet_mg=("5", "12.5", "50", "125", "150", "300", "400", "600"),
    ),
    Site(  # rural hospital without pumps: mostly gravity drips
        name="site-d",
        train_rows=240,
        task_mix={
            "drip_rate": 0.5,
            "infusion_rate": 0.2,
            "tablet_count": 0.15,
            "weight_dose": 0.1,
            "unit_conversion": 0.05,
        },
        weight_kg=Grid("50", "100", "1"),
        child_weight_kg=Grid("10", "40", "1"),
        mg_per_kg=("1", "2", "4", "5", "10"),
        mg_per_kg_day=("20", "40"),
        volumes_ml=("100", "200", "250", "500", "1000"),
        hours=("1", "2", "3", "4", "5", "6", "8"),
        tablet_mg=("50", "100", "250", "500", "1000"),
    ),
    Site(  # children's hospital: mostly pediatric divided doses, small weights
        name="site-e",
        train_rows=280,
        task_mix={
            "pediatric_split": 0.55,
            "weight_dose": 0.25,
            "drip_rate": 0.1,
            "tablet_count": 0.05,
            "unit_conversion": 0.05,
        },
        weight_kg=Grid("3", "40", "0.1"),
        child_weight_kg=Grid("3", "40", "0.1"),
        mg_per_kg=("1", "2", "5", "7.5", "10", "12.5", "15", "20"),
        mg_per_kg_day=("10", "15", "20", "25", "30", "40", "45", "50", "60", "75", "90"),
        volumes_ml=("50", "100", "150", "200", "250", "500"),
        hours=("1", "2", "3", "4", "6"),
        tablet_mg=("5", "10", "25", "50", "100"),
    ),
)


class NotExactError(Exception):
    """Raised when a drawn number would need rounding; the caller simply draws again."""


def fmt(value: Decimal) -> str:
    """Format a number with at most one decimal, refusing anything that would need rounding."""
    if value != value.quantize(ONE_DECIMAL):
        raise NotExactError
    return f"{value.quantize(ONE_DECIMAL):f}".removesuffix(".0")


def count_of(value: Decimal, noun: str) -> str:
    """Write a count with its noun, singular only for exactly one ("1 hour", "1.5 tablets")."""
    return f"{fmt(value)} {noun}" if value == 1 else f"{fmt(value)} {noun}s"


def pick(rng: random.Random, values: tuple[str, ...]) -> Decimal:
    """Pick one of the decimal strings in `values`."""
    return Decimal(rng.choice(values))


def weight_dose(rng: random.Random, site: Site) -> tuple[str, str]:
    """Ask for a single dose from body weight and mg/kg."""
    drug, weight, per_kg = rng.choice(DRUGS), site.weight_kg.draw(rng), pick(rng, site.mg_per_kg)
    dose = per_kg * weight
    question = rng.choice(
        (
            (
                f"A patient weighing {fmt(weight)} kg is prescribed {drug} at {fmt(per_kg)} mg/kg."
                " What total dose should be given?"
            ),
            (
                f"{drug} is ordered at {fmt(per_kg)} mg/kg for a patient who weighs"
                f" {fmt(weight)} kg. How many mg is one dose?"
            ),
        )
    )
    answer = f"Dose = {fmt(per_kg)} mg/kg x {fmt(weight)} kg = {fmt(dose)} mg."
    return question, answer


def infusion_rate(rng: random.Random, site: Site) -> tuple[str, str]:
    """Ask for a pump rate in mL/h from volume and duration."""
    drug, volume, hours = rng.choice(DRUGS), pick(rng, site.volumes_ml), pick(rng, site.hours)
    rate, duration = volume / hours, count_of(hours, "hour")
    question = rng.choice(
        (
            (
                f"{fmt(volume)} mL of {drug} solution must be infused over {duration}."
                " What infusion rate in mL/h should the pump be set to?"
            ),
            f"Infuse {fmt(volume)} mL of {drug} over {duration}. What is the rate in mL/h?",
        )
    )
    answer = f"Rate = {fmt(volume)} mL / {fmt(hours)} h = {fmt(rate)} mL/h."
    return question, answer


def tablet_count(rng: random.Random, site: Site) -> tuple[str, str]:
    """Ask for the number of tablets for an ordered dose."""
    drug, strength = rng.choice(DRUGS), pick(rng, site.tablet_mg)
    count = pick(rng, TABLETS_PER_DOSE)
    dose = strength * count
    question = rng.choice(
        (
            (
                f"The order is {drug} {fmt(dose)} mg. Tablets on hand contain {fmt(strength)} mg"
                " each. How many tablets should be given?"
            ),
            (
                f"{drug} tablets are {fmt(strength)} mg each and {fmt(dose)} mg is prescribed."
                " How many tablets are needed?"
            ),
        )
    )
    tablets = count_of(count, "tablet")
    answer = f"Tablets = {fmt(dose)} mg / {fmt(strength)} mg = {tablets}."
    return question, answer


def unit_conversion(rng: random.Random, site: Site) -> tuple[str, str]:
    """Ask for a conversion between g, mg and mcg (the same ranges at every site)."""
    del site  # the conversions do not depend on the site
    drug = rng.choice(DRUGS)
    source, target, multiply = rng.choice(CONVERSIONS)
    if multiply:
        amount = Decimal(rng.randint(1, 50)) / 10  # 0.1 .. 5
        result = amount * 1000
        formula = f"{fmt(amount)} {source} x 1000 {target}/{source}"
    else:
        amount = Decimal(rng.randint(1, 60) * 100)  # 100 .. 6000
        result = amount / 1000
        formula = f"{fmt(amount)} {source} / 1000 {source}/{target}"
    question = rng.choice(
        (
            f"A vial label lists {fmt(amount)} {source} of {drug}. Convert the amount to {target}.",
            f"How many {target} are in {fmt(amount)} {source} of {drug}?",
        )
    )
    answer = f"{formula} = {fmt(result)} {target}."
    return question, answer


def drip_rate(rng: random.Random, site: Site) -> tuple[str, str]:
    """Ask for a gravity drip rate in drops/min from volume, time and drop factor."""
    drug, volume, hours = rng.choice(DRUGS), pick(rng, site.volumes_ml), pick(rng, site.hours)
    drop_factor = pick(rng, DROP_FACTORS)
    minutes, duration = hours * 60, count_of(hours, "hour")
    rate = volume * drop_factor / minutes
    question = rng.choice(
        (
            (
                f"{fmt(volume)} mL of {drug} is to run over {duration} by gravity with a"
                f" drop factor of {fmt(drop_factor)} gtt/mL. What is the drip rate in gtt/min?"
            ),
            (
                f"Give {fmt(volume)} mL of {drug} over {duration} using a"
                f" {fmt(drop_factor)} gtt/mL set. How many drops per minute?"
            ),
        )
    )
    answer = f"Drip rate = {fmt(volume)} mL x {fmt(drop_factor)} gtt/mL / {fmt(minutes)} min = {fmt(rate)} gtt/min."
    return question, answer


def pediatric_split(rng: random.Random, site: Site) -> tuple[str, str]:
    """Ask for one dose of a child's daily mg/kg amount divided into N doses."""
    drug, weight = rng.choice(DRUGS), site.child_weight_kg.draw(rng)
    per_day, doses = pick(rng, site.mg_per_kg_day), rng.choice(DOSES_PER_DAY)
    per_dose = per_day * weight / doses
    question = rng.choice(
        (
            (
                f"A child weighing {fmt(weight)} kg needs {drug} {fmt(per_day)} mg/kg/day divided"
                f" into {doses} doses. How many mg per dose?"
            ),
            (
                f"{drug} is prescribed at {fmt(per_day)} mg/kg/day in {doses} divided doses for a"
                f" {fmt(weight)} kg child. What is each dose?"
            ),
        )
    )
    answer = f"Per dose = {fmt(per_day)} mg/kg/day x {fmt(weight)} kg / {doses} = {fmt(per_dose)} mg."
    return question, answer


MAKERS: dict[str, Callable[[random.Random, Site], tuple[str, str]]] = {
    "weight_dose": weight_dose,
    "infusion_rate": infusion_rate,
    "tablet_count": tablet_count,
    "unit_conversion": unit_conversion,
    "drip_rate": drip_rate,
    "pediatric_split": pediatric_split,
}


def allocate(total: int, mix: dict[str, float]) -> dict[str, int]:
    """Split `total` rows over tasks in proportion to `mix` (largest-remainder rounding)."""
    weight_sum = sum(mix.values())
    exact = {task: total * share / weight_sum for task, share in mix.items()}
    counts = {task: int(value) for task, value in exact.items()}
    by_remainder = sorted(mix, key=lambda task: (counts[task] - exact[task], TASKS.index(task)))
    for task in by_remainder[: total - sum(counts.values())]:
        counts[task] += 1
    return counts


def make_rows(rng: random.Random, site: Site, total: int, seen: set[str]) -> list[Row]:
    """Draw `total` rows for one site; `seen` holds every instruction used so far (no repeats)."""
    rows = []
    for task, count in allocate(total, site.task_mix).items():
        made = 0
        for _ in range(MAX_ATTEMPTS):
            if made == count:
                break
            try:
                question, answer = MAKERS[task](rng, site)
            except NotExactError:
                continue
            if question in seen:
                continue
            seen.add(question)
            rows.append(
                {
                    "instruction": question,
                    "input": "",
                    "output": answer,
                    "site": site.name,
                    "task": task,
                }
            )
            made += 1
        if made < count:
            raise RuntimeError(f"could not draw {count} unique {task} rows for {site.name}")
    rng.shuffle(rows)
    return rows


def generate(seed: int = DEFAULT_SEED) -> tuple[list[Row], list[Row]]:
    """Build the (train, test) rows for all sites, deterministically from `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[Row] = []
    test: list[Row] = []
    for site in SITES:
        train += make_rows(rng, site, site.train_rows, seen)
        test += make_rows(rng, site, TEST_ROWS_PER_SITE, seen)
    return train, test


def write_jsonl(path: Path, rows: list[Row]) -> None:
    """Write rows as UTF-8 JSON Lines with Unix newlines."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    """Command-line entry point: write train.jsonl and test.jsonl (next to this file by default)."""
    parser = argparse.ArgumentParser(description="Generate the synthetic demo dataset.")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    train, test = generate(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test rows to {args.out_dir}")


if __name__ == "__main__":
    main()
