"""Data: response-only labels, prompt formats, loaders and partitions fail with clear lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.config import DataConfig
from fedtune.core.errors import ConfigError, DataError
from fedtune.data.loaders import DEMO_TRAIN, load_records
from fedtune.data.partition import site_partition, train_heldout
from fedtune.data.prompts import IGNORE, check_format, render_prompt, tokenize
from fedtune.model.sources import load_tokenizer

RECORD = {"instruction": "Convert 2 g to mg.", "input": "", "output": "2 g x 1000 = 2000 mg."}


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_labels_cover_exactly_the_response(tiny_model: Path, fmt: str) -> None:
    # Prepare
    tok = load_tokenizer(str(tiny_model))
    cfg = DataConfig(format=fmt, max_seq_len=512)  # type: ignore[arg-type]

    # Execute
    (example,) = tokenize([RECORD], cfg, tok)

    # Assert
    prompt_len = len(tok(render_prompt(RECORD, cfg, tok), add_special_tokens=False)["input_ids"])
    assert example.labels[:prompt_len] == [IGNORE] * prompt_len
    response = [t for t in example.labels if t != IGNORE]
    assert tok.decode(response) == RECORD["output"] + tok.eos_token
    assert example.input_ids[prompt_len:] == response


def test_right_truncation_keeps_ids_and_labels_aligned(tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    (example,) = tokenize([RECORD], DataConfig(format="alpaca", max_seq_len=10, truncation="right"), tok)
    assert len(example.input_ids) == len(example.labels) == 10


def test_chat_format_needs_a_chat_template(tiny_model_no_template: Path) -> None:
    tok = load_tokenizer(str(tiny_model_no_template))
    with pytest.raises(ConfigError, match=r'`data.format` = "chat" needs a tokenizer with a chat template'):
        check_format(DataConfig(format="chat"), tok, "tiny")
    check_format(DataConfig(format="alpaca"), tok, "tiny")


def test_missing_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"`data.path`: no such data file"):
        load_records(str(tmp_path / "nope.jsonl"), DataConfig())


def test_missing_column_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "output": "a"}) + "\n")
    with pytest.raises(DataError, match=r"no column 'instruction' \(set `data.instruction-field`\)"):
        load_records(str(path), DataConfig())


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_file_formats_load(tmp_path: Path, suffix: str) -> None:
    # Prepare
    import datasets

    rows = [dict(RECORD, site="a"), dict(RECORD, site="b")]
    path = tmp_path / f"d.{suffix}"
    ds = datasets.Dataset.from_list(rows)
    {
        "jsonl": lambda: ds.to_json(str(path)),
        "csv": lambda: ds.to_csv(str(path)),
        "parquet": lambda: ds.to_parquet(str(path)),
    }[suffix]()

    # Execute
    loaded = load_records(str(path), DataConfig())

    # Assert
    assert len(loaded) == 2 and loaded[0]["output"] == RECORD["output"]


def test_natural_partition_follows_site_column() -> None:
    cfg = DataConfig(partitioner="natural", partition_by="site")
    rows = load_records(str(DEMO_TRAIN), cfg)
    sizes = [len(site_partition(rows, cfg, pid, 5, seed=0)) for pid in range(5)]
    assert sum(sizes) == len(rows)
    assert all(len(set(site_partition(rows, cfg, pid, 5, seed=0)["site"])) == 1 for pid in range(5))


def test_natural_partition_count_mismatch_is_explained() -> None:
    cfg = DataConfig(partitioner="natural")
    rows = load_records(str(DEMO_TRAIN), cfg)
    with pytest.raises(ConfigError, match=r"one site per distinct `site` value \(5\), but the federation has 3") as err:
        site_partition(rows, cfg, 0, 3, seed=0)
    assert "--clients to 5" in str(err.value) and "`--share K/5`" in str(err.value)


def test_empty_partition_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(json.dumps(dict(RECORD, site=str(i))) for i in range(3)) + "\n")
    cfg = DataConfig(path=str(path), partitioner="iid")
    part = site_partition(load_records(str(path), cfg), cfg, 0, 3, seed=0)
    with pytest.raises(DataError, match=r"site 0: partition holds 1 record"):
        train_heldout(part, cfg, seed=0, site="site 0")
