"""Console logging for fedtune's own logger (idempotent; Flower configures only its own)."""

from __future__ import annotations

import logging
import os
import warnings


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``fedtune.*`` records to stderr once per process."""
    logger = logging.getLogger("fedtune")
    logger.setLevel(level)
    if not any(getattr(h, "_fedtune", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(_Formatter())
        handler._fedtune = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


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


class _DropDeprecationNotice(logging.Filter):
    """Drops Flower's notice that the Python ``run_simulation`` API is deprecated; fedtune chose it
    deliberately so the CLI can pass typed config and check it before the engine starts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def quiet_flower() -> None:
    """Hide Flower's run_simulation deprecation notice (see :class:`_DropDeprecationNotice`)."""
    logging.getLogger("flwr").addFilter(_DropDeprecationNotice())
