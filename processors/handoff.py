"""The one queue type between the worker's stages.

A stage puts entries in; the next one waits for them and takes a run of
them at once (`take`, with a rule for how many), so work that piled up while
it was busy goes on together. A revoke removes the entries of lost
partitions (`remove`). `close()` tells the taker that nothing more comes: it
gets what is left, then None.

The bound is the worker's, not the queue's: every record in any hand-off is
counted by `PartitionState`, and intake stops fetching past
`max_pending_items` / `max_uncommitted_items`, so no hand-off grows beyond
those however the stages run.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self, name: str) -> None:
        self.name = name
        self._q: deque[T] = deque()
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self):
        return iter(self._q)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, entry: T) -> None:
        if self._closed:
            raise RuntimeError(f"hand-off {self.name} is closed")
        self._q.append(entry)
        self._ready.set()

    def extend(self, entries: list[T]) -> None:
        for e in entries:
            self.put(e)

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def take(
        self, limit: int | None = None, weight: Callable[[T], int] = lambda _: 1, *, whole: bool = True
    ) -> list[T]:
        """Wait for an entry, take it, and take the ones after it while the
        run's weight allows: with `whole`, while the next one still fits
        within `limit`; without, until the run has reached `limit` (the last
        one may pass it). No limit: just the first. [] once closed and empty."""
        while not self._q:
            if self._closed:
                return []
            self._ready.clear()
            await self._ready.wait()
        first = self._q.popleft()
        taken, total = [first], weight(first)
        while self._q and limit is not None:
            w = weight(self._q[0])
            if (total + w > limit) if whole else (total >= limit):
                break
            taken.append(self._q.popleft())
            total += w
        return taken

    def remove(self, drop: Callable[[T], bool]) -> list[T]:
        """Take out every entry `drop` says; return them."""
        gone = [e for e in self._q if drop(e)]
        if gone:
            self._q = deque(e for e in self._q if not drop(e))
        return gone

    def replace(self, entries: list[T]) -> None:
        self._q = deque(entries)
