"""The sink's exceptions, under the project's one root (SluiceError)."""

from __future__ import annotations

from schemas.errors import SluiceError


class SinkError(SluiceError):
    """The store failed (unreachable, rejected an insert, bad query)."""

    code = "sink"
    retriable = True


class QueryError(SinkError):
    """A query was refused or failed; the caller's fault, not retriable."""

    code = "query"
    retriable = False
