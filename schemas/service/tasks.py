"""Background tasks that are never fire-and-forget.

`supervise` keeps the task referenced (the event loop holds only a weak
reference, so an unreferenced task can vanish mid-run) and, when it ends
with an exception, logs it with its traceback and hands it to `on_failure`,
which decides what it means for the owner (fail the callers waiting on it,
stop the process, ...). A cancelled task is not a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_RUNNING: set[asyncio.Task[Any]] = set()


def supervise(
    coro: Coroutine[Any, Any, T], *, name: str, on_failure: Callable[[BaseException], None] | None = None
) -> asyncio.Task[T]:
    """Start `coro` as a task whose failure surfaces; return the task."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _RUNNING.add(task)

    def done(t: asyncio.Task[T]) -> None:
        _RUNNING.discard(t)
        if t.cancelled():
            return
        exc = t.exception()
        if exc is None:
            return
        log.error("background task %s failed: %r", name, exc, exc_info=exc)
        if on_failure is not None:
            on_failure(exc)

    task.add_done_callback(done)
    return task
