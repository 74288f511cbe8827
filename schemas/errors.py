"""One root exception for Sluice; each stage raises a subclass.

`retriable` tells the caller whether trying again can succeed; `code` is the
stable, machine-readable name that results and metrics carry (`error_label`
maps any exception to it, "internal" for one that is not ours). The CLI
prints an expected SluiceError as one line, `sluice <command>: <message>`.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class SluiceError(Exception):
    code = "internal"
    retriable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class ConfigError(SluiceError):
    """A setting is missing or invalid; raised at start, names the setting."""

    code = "config"


class RequestError(SluiceError):
    """A request cannot be served as sent (bad field, unknown model, ...).

    `request_id` is set when the record had a usable id, so the worker can
    answer it with an error result instead of sending it to the DLQ.
    """

    code = "invalid_request"

    def __init__(self, message: str, *, code: str, request_id: str | None = None, reply_to: str | None = None) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id
        self.reply_to = reply_to


class ModelError(SluiceError):
    code = "model_error"


class MissingExtra(SluiceError):
    """An optional part was asked for but its packages are not installed;
    the message says which extra to install."""

    code = "missing_extra"


def require_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module` (a heavy optional dependency) or raise MissingExtra
    with the install hint: `pip install 'sluice[EXTRA]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{purpose} needs the '{extra}' extra ({exc}): pip install 'sluice[{extra}]'") from None


def error_label(exc: BaseException) -> str:
    """The metric label of an error: its code if it is one of ours, else
    "internal" (a bug, or a library's exception nothing mapped)."""
    return exc.code if isinstance(exc, SluiceError) else SluiceError.code
