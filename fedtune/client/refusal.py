"""A site's refusal: the Error reply a ClientApp handler gives instead of an answer (light: Flower only)."""

from __future__ import annotations

import logging

from flwr.app import Error, Message

from fedtune.core.errors import FedtuneError

log = logging.getLogger(__name__)

ERROR_CODE = 1  # Flower's Error.code for "failed precondition at the site"


def refuse(msg: Message, exc: FedtuneError) -> Message:
    """Log ``exc`` and reply to ``msg`` with an Error that carries its one line."""
    log.error("%s", exc)
    return Message(Error(code=ERROR_CODE, reason=str(exc)), reply_to=msg)
