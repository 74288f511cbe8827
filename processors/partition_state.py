"""What the worker holds, counted in one place: the partitions it owns,
records waiting for a group (pending), records taken and not yet committed
(in flight), misses waiting for the model; when intake may fetch more; and
what a revoke drops."""

from __future__ import annotations

import asyncio

from processors.batching import Batcher, PartitionBatch
from processors.coalescing import Coalescer
from processors.handoff import Handoff
from processors.items import Group, Item
from processors.metrics import WorkerMetrics


class PartitionState:
    def __init__(self, metrics: WorkerMetrics, *, max_pending_items: int, max_uncommitted_items: int) -> None:
        self.metrics = metrics
        self.max_pending_items = max_pending_items
        self.max_uncommitted_items = max_uncommitted_items
        self.assigned: set[int] = set()
        self.pending_items = 0  # in batches handed out by the batcher, not yet in a group
        self.inflight_items = 0  # taken into a group, not yet committed
        self.awaiting_model = 0  # cache misses queued for or inside the model
        self.idle = asyncio.Event()  # nothing in flight: a revoke may finish
        self.idle.set()
        self.has_room = asyncio.Event()

    def full(self) -> bool:
        """Past either bound intake stops fetching; the backlog waits in Kafka."""
        return (
            self.pending_items + self.awaiting_model >= self.max_pending_items
            or self.pending_items + self.inflight_items >= self.max_uncommitted_items
        )

    def room_made(self) -> None:
        self.has_room.set()

    def batched(self, n: int) -> None:
        self.pending_items += n
        self.metrics.pending.set(self.pending_items)

    def grouped(self, n: int) -> None:
        self.pending_items -= n
        self.inflight_items += n
        self.idle.clear()
        self.metrics.pending.set(self.pending_items)
        self.metrics.inflight.set(self.inflight_items)

    def queued_for_model(self, misses: int) -> None:
        self.awaiting_model += misses

    def modelled(self, misses: int) -> None:
        self.awaiting_model -= misses

    def committed(self, n: int) -> None:
        self.inflight_items -= n
        self.metrics.inflight.set(self.inflight_items)
        if self.inflight_items == 0:
            self.idle.set()
        self.has_room.set()

    def drop(
        self,
        parts: set[int],
        batcher: Batcher[Item],
        pending: Handoff[PartitionBatch[Item]],
        model_queue: Handoff[Group],
        coalescer: Coalescer,
    ) -> int:
        """Forget what of these partitions the model has not taken: it is
        uncommitted, so the partition's next owner reads it again (answers
        already sent from cache are then sent twice: at-least-once). Return
        how many records were dropped."""
        dropped = batcher.drop(parts)
        gone = pending.remove(lambda b: b.partition in parts)
        n = sum(len(b) for b in gone)
        dropped += n
        self.pending_items -= n
        queued: list[Group] = []
        for g in model_queue:
            for b in g.batches:
                if b.partition in parts:
                    for it in b.items:
                        it.dropped = True
                        coalescer.release(it)
            kept = [b for b in g.batches if b.partition not in parts]
            lost = len(g.items) - sum(len(b) for b in kept)
            dropped += lost
            self.inflight_items -= lost
            self.awaiting_model -= g.misses
            if kept:
                q = Group(kept, computed=[])
                self.awaiting_model += q.count_misses()
                queued.append(q)
        model_queue.replace(queued)
        if self.inflight_items == 0:
            self.idle.set()
        self.metrics.pending.set(self.pending_items)
        self.metrics.inflight.set(self.inflight_items)
        return dropped
