"""The errors secure aggregation raises: a failed check on a message, or a round that cannot finish."""

from __future__ import annotations

from fedtune.core.errors import FedtuneError


class SecAggError(FedtuneError):
    """A SecAgg+ message failed a check (authentication, format, share commitment), or a round cannot finish."""


class TooFewSurvivors(SecAggError):
    """Fewer than ``threshold`` share holders answered, so the round must be abandoned; nothing is released."""
