"""``fedtune fetch-model``: cache the demo model locally."""

from __future__ import annotations

import argparse


def add_fetch_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedtune fetch-model smollm2``."""
    fetch = sub.add_parser("fetch-model", help="cache the demo model locally (dequantized once)")
    fetch.add_argument("name", choices=["smollm2"])
    fetch.set_defaults(func=_fetch_model)


def _fetch_model(args: argparse.Namespace) -> None:
    from fedtune.model.sources import fetch_smollm2

    path = fetch_smollm2()
    print(path)
