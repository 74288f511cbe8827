"""The control plane's exceptions, under the project's one root (SluiceError)."""

from __future__ import annotations

from schemas.errors import SluiceError


class StackError(SluiceError):
    """The local stack (Kafka, Redis) could not be started or reached."""

    code = "stack"
    retriable = True
