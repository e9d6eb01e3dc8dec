"""``fedtune chat``: talk to a run's model in the run's prompt format (``fedtune.model.chat`` does the work)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path


def add_chat(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedtune chat OUT [--prompt TEXT] [--base]``."""
    parser = sub.add_parser("chat", help="answer prompts with a run's model (one-shot, or one per line of stdin)")
    parser.add_argument("run", metavar="OUT", help="a finished run's directory")
    parser.add_argument("--prompt", help="answer this one message and exit (default: read messages from stdin)")
    parser.add_argument("--base", action="store_true", help="answer with the base model instead, for comparison")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (256)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (auto)")
    parser.set_defaults(func=_chat)


def _lines() -> Iterator[str]:
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _chat(args: argparse.Namespace) -> None:
    from fedtune.core.errors import ConfigError
    from fedtune.model.chat import answer, converse
    from fedtune.model.finished import load_run_model, open_run
    from fedtune.model.loading import pick_device, pick_dtype

    if args.max_new_tokens < 1:
        raise ConfigError(f"`--max-new-tokens` must be >= 1, got {args.max_new_tokens}.")
    run = open_run(Path(args.run))
    device = pick_device(args.device)
    model, tokenizer = load_run_model(
        run, base=args.base, dtype=pick_dtype(run.cfg.model.dtype, device), device=str(device)
    )
    options = {"max_new_tokens": args.max_new_tokens, "on_text": _write}
    if args.prompt is not None:
        answer(model, tokenizer, args.prompt, run.cfg.data, **options)
        _write("\n")
    else:
        converse(model, tokenizer, _lines(), run.cfg.data, **options)
