"""``fedtune export``: a finished run's model as a Hub-ready folder (``fedtune.model.export`` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedtune export OUT --out DIR [--merge] [--dtype bf16|fp16|fp32]``."""
    parser = sub.add_parser("export", help="write a run's model, tokenizer and model card as a Hub-ready folder")
    parser.add_argument("run", metavar="OUT", help="a finished run's directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base (a full model)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32", help="weights dtype (fp32)")
    parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> None:
    from fedtune.model.export import export_run
    from fedtune.model.finished import open_run

    run = open_run(Path(args.run))
    dest = export_run(run, Path(args.out), merge=args.merge, dtype=args.dtype)
    kind = "merged model" if args.merge or not run.peft else "adapter"
    print(f"Exported the {kind} of {args.run} to {dest} (README.md is its model card).")
