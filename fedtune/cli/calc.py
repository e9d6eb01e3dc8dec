"""``fedtune privacy epsilon|noise``: the Opacus accountants as calculators."""

from __future__ import annotations

import argparse

from fedtune.core.errors import FedtuneError


def add_privacy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedtune privacy``, with its ``epsilon`` and ``noise`` calculators."""
    priv = sub.add_parser("privacy", help="privacy calculators (the number alone is the last line)")
    priv_sub = priv.add_subparsers(dest="what", required=True)
    for what, help_text in (
        ("epsilon", "epsilon of a DP-SGD / DP-FedAvg schedule"),
        ("noise", "noise multiplier for a target epsilon"),
    ):
        calc = priv_sub.add_parser(what, help=help_text)
        if what == "epsilon":
            calc.add_argument("--noise-multiplier", type=float, required=True, help="sigma (noise std / clip norm)")
        else:
            calc.add_argument("--target-epsilon", type=float, required=True, help="the epsilon to stay within")
        calc.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
        calc.add_argument("--steps", type=int, required=True, help="number of steps (or rounds)")
        calc.add_argument("--delta", type=float, required=True, help="delta")
        calc.add_argument("--accountant", choices=["rdp", "prv"], default="rdp", help="Opacus accountant")
        calc.set_defaults(func=_privacy)


def _privacy(args: argparse.Namespace) -> None:
    from fedtune.privacy.accounting import GaussianEvent, epsilon, noise_multiplier

    for flag, ok in (
        ("--sample-rate", 0 < args.sample_rate <= 1),
        ("--steps", args.steps >= 1),
        ("--delta", 0 < args.delta < 1),
        ("--noise-multiplier", getattr(args, "noise_multiplier", 1.0) >= 0),
        ("--target-epsilon", getattr(args, "target_epsilon", 1.0) > 0),
    ):
        if not ok:
            raise FedtuneError(f"`{flag}` is out of range (sample rate in (0, 1], steps >= 1, delta in (0, 1)).")
    name = f"{args.accountant.upper()} accountant (Opacus)"
    if args.what == "epsilon":
        event = GaussianEvent(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate, steps=args.steps)
        value = epsilon([event], args.delta, args.accountant)
        print(f"epsilon, {name}: {args.steps} steps, noise multiplier {args.noise_multiplier},")
    else:
        value = noise_multiplier(args.target_epsilon, args.sample_rate, args.steps, args.delta, args.accountant)
        print(f"noise multiplier for epsilon <= {args.target_epsilon}, {name}: {args.steps} steps,")
    print(f"Poisson sample rate {args.sample_rate}, delta {args.delta}:")
    print(value)
