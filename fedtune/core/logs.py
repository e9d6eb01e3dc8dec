"""Console logging for fedtune's own logger (idempotent; Flower configures only its own)."""

from __future__ import annotations

import logging
import os
import sys
import unicodedata
import warnings


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno == logging.INFO:
            return text
        return f"{record.levelname}: " + text.replace("\n", "\n  ")  # one warning reads as one block


class _Below(logging.Filter):
    """Passes records below ``level`` (the stdout half of a stdout/stderr split)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``fedtune.*`` records to the console once per process: progress and results to stdout,
    warnings and errors to stderr."""
    logger = logging.getLogger("fedtune")
    if not any(getattr(h, "_fedtune", False) for h in logger.handlers):  # the first call sets the level
        logger.setLevel(level)
        out = logging.StreamHandler(sys.stdout)
        out.addFilter(_Below(logging.WARNING))
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        for handler in (out, err):
            handler.setFormatter(_Formatter())
            handler._fedtune = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False


CONSOLE_ENV = "FEDTUNE_CONSOLE_LOG"  # "1": the ClientApp's process logs fedtune's records to the console
VERBOSE_ENV = "FEDTUNE_VERBOSE"  # set by `fedtune --verbose`, inherited by the processes it starts


def readable_flower(verbose: bool | None = None) -> None:
    """Flower's console in this process as fedtune's: INFO to stdout, warnings to stderr, colour
    codes only on a terminal, DEBUG only with ``--verbose`` (``verbose``, else :data:`VERBOSE_ENV`)."""
    from flwr.supercore.logger import ConsoleHandler, console_handler

    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"

    flwr = logging.getLogger("flwr")
    flwr.propagate = False  # its own console handler shows it; a root handler (Ray's) repeated DEBUG lines
    try:
        console_handler.setStream(sys.stdout)  # flushes the stream it had
    except ValueError:  # that stream is closed (a caller swapped sys.stdout and closed it): just replace it
        console_handler.stream = sys.stdout
    console_handler.colored = sys.stdout.isatty()
    console_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(f, "level", None) == logging.WARNING for f in console_handler.filters):
        console_handler.addFilter(_Below(logging.WARNING))
    if not any(getattr(h, "_fedtune", False) for h in flwr.handlers):
        err = ConsoleHandler(colored=sys.stderr.isatty(), stream=sys.stderr)
        err.setLevel(logging.WARNING)
        err._fedtune = True  # type: ignore[attr-defined]
        flwr.addHandler(err)


def printable(text: str) -> str:
    """``text`` with control characters, undecodable bytes (U+FFFD) and other non-printing code
    points written as escapes, so a model's answer cannot garble the terminal."""
    return "".join(
        ch
        if ch in "\n\t" or not (unicodedata.category(ch).startswith("C") or ch == "\ufffd")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def block(text: str, indent: int) -> str:
    """A multi-line ``text`` (printable) with every line after the first indented by ``indent``."""
    return printable(str(text)).replace("\n", "\n" + " " * indent)


def quiet_libraries() -> None:
    """Silence library chatter (weight-loading bars, deprecation notices) in this process and the
    simulation workers it starts, which inherit the environment."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # library bars; fedtune's own bar sets disable=False
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Opacus on a frozen base: the hook fires on module outputs by design (only LoRA layers train).
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    # RDP says a wider order range could tighten epsilon; the epsilon reported is still a valid bound.
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    readable_flower()  # here too in a Ray worker or a Flower app process: no colour codes in a log


class _DropDeprecationNotice(logging.Filter):
    """Drops Flower's notice that the Python ``run_simulation`` API is deprecated; fedtune chose it
    deliberately so the CLI can pass typed config and check it before the engine starts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def quiet_flower() -> None:
    """Hide Flower's run_simulation deprecation notice (see :class:`_DropDeprecationNotice`)."""
    logging.getLogger("flwr").addFilter(_DropDeprecationNotice())
