"""The batch policy: when a partition's records form a batch.

Pure objects, no I/O and no clock of their own (the caller passes `now`), so
they are unit-tested alone. Tokens are the main budget and records an
optional cap; the wait deadline starts at a batch's first record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_items: int = 64
    max_tokens: int = 4096
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError(f"batch_max_items={self.max_items}: must be >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"batch_max_tokens={self.max_tokens}: must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError(f"batch_max_wait_ms={self.max_wait_ms}: must be >= 0")

    def fits(self, batch: PartitionBatch, tokens: int) -> bool:
        """Whether one more record of `tokens` fits. An empty batch takes any
        record, so a record larger than the budget fails alone rather than
        stalling its partition."""
        if not batch.items:
            return True
        return len(batch.items) < self.max_items and batch.tokens + tokens <= self.max_tokens

    def full(self, batch: PartitionBatch) -> bool:
        return len(batch.items) >= self.max_items or batch.tokens >= self.max_tokens

    def due_at(self, batch: PartitionBatch) -> float:
        """Monotonic time (s) at which the batch must go, full or not."""
        return batch.first_at + self.max_wait_ms / 1000.0

    def ready(self, batch: PartitionBatch, now: float) -> bool:
        return bool(batch.items) and (self.full(batch) or now >= self.due_at(batch))


@dataclass(slots=True)
class PartitionBatch(Generic[T]):
    """Records of one partition waiting to be processed, in offset order."""

    partition: int
    items: list[T] = field(default_factory=list)
    tokens: int = 0
    first_at: float = 0.0
    first_offset: int = -1
    last_offset: int = -1

    def append(self, item: T, *, tokens: int, offset: int, now: float) -> None:
        if not self.items:
            self.first_at = now
            self.first_offset = offset
        self.items.append(item)
        self.tokens += tokens
        self.last_offset = offset

    def __len__(self) -> int:
        return len(self.items)


class Batcher(Generic[T]):
    """Per-partition batches under one policy; hands out ready batches.

    A record that would overflow its partition's open batch closes that batch
    (it is ready now) and opens the next one, so order within a partition is
    kept and no batch ever exceeds the budget with more than one record.
    """

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._open: dict[int, PartitionBatch[T]] = {}
        self._closed: list[PartitionBatch[T]] = []

    def add(self, partition: int, item: T, *, tokens: int, offset: int, now: float) -> None:
        batch = self._open.get(partition)
        if batch is None:
            batch = self._open[partition] = PartitionBatch(partition)
        elif not self.policy.fits(batch, tokens):
            self._closed.append(batch)
            batch = self._open[partition] = PartitionBatch(partition)
        batch.append(item, tokens=tokens, offset=offset, now=now)

    def take_ready(self, now: float) -> list[PartitionBatch[T]]:
        """Closed batches plus open ones that are full or due, oldest first."""
        ready, self._closed = self._closed, []
        for part, batch in list(self._open.items()):
            if self.policy.ready(batch, now):
                ready.append(batch)
                del self._open[part]
        ready.sort(key=lambda b: b.first_at)
        return ready

    def next_due(self) -> float | None:
        """Earliest deadline of the open batches (None if nothing waits)."""
        if self._closed:
            return 0.0
        dues = [self.policy.due_at(b) for b in self._open.values() if b.items]
        return min(dues) if dues else None

    def drop(self, partitions: set[int]) -> int:
        """Forget the batches of revoked partitions (their records were not
        committed; the partition's next owner reads them again)."""
        n = sum(len(b) for b in self._open.values() if b.partition in partitions)
        n += sum(len(b) for b in self._closed if b.partition in partitions)
        self._open = {p: b for p, b in self._open.items() if p not in partitions}
        self._closed = [b for b in self._closed if b.partition not in partitions]
        return n

    def pending(self) -> int:
        return sum(len(b) for b in self._open.values()) + sum(len(b) for b in self._closed)
