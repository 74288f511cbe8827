"""Stage 2, lookup: take pending batches (several partitions, up to
`group_max_items` records), answer at once what needs no model (errors,
expired deadlines, L1 and L2 hits: one MGET for the batch), and attach
misses whose key is already queued or computing to that computation
(coalesced). The rest goes to the model stage as one group."""

from __future__ import annotations

import time
from collections.abc import Callable

from processors.answers import AnswerSender
from processors.batching import PartitionBatch
from processors.cache import CacheMetrics, L1Cache, L2Cache, storage_key
from processors.coalescing import Coalescer
from processors.handoff import Handoff
from processors.items import Group, Item
from processors.metrics import WorkerMetrics
from processors.partition_state import PartitionState
from schemas.records import now_ms

KILL_SWITCH = "kill_switch"


class Lookup:
    def __init__(
        self,
        *,
        group_max_items: int,
        l1: L1Cache,
        l2: L2Cache,
        coalescer: Coalescer,
        sender: AnswerSender,
        state: PartitionState,
        metrics: WorkerMetrics,
        cache_metrics: CacheMetrics,
        stopped: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.group_max_items = group_max_items
        self.stopped = stopped  # why inference is stopped (the kill switch), or None
        self.l1 = l1
        self.l2 = l2
        self.coalescer = coalescer
        self.sender = sender
        self.state = state
        self.metrics = metrics
        self.cache_metrics = cache_metrics

    async def run(self, pending: Handoff[PartitionBatch[Item]], model_queue: Handoff[Group]) -> None:
        """Until intake closes `pending`; then close `model_queue`."""

        # a group: the pending batches that fit in group_max_items records (at least one)
        while batches := await pending.take(self.group_max_items, len):
            self.state.grouped(sum(len(b) for b in batches))
            group = Group(batches)
            await self.look_up(group)
            self.state.queued_for_model(group.count_misses())
            model_queue.put(group)
        model_queue.close()

    async def look_up(self, group: Group) -> None:
        """Errors, expired deadlines and cache hits are answered at once, so
        they never wait behind the model; the rest go on as misses."""
        started = now_ms()
        t0 = time.perf_counter()
        wanted: dict[str, list[Item]] = {}  # key -> items that may be served from cache
        for it in group.items:
            if it.sent is not None:
                continue  # answered at intake
            it.started_ms = started
            s = it.serve
            if s is None:
                it.status = "error"
            elif it.expire_if_due(started):
                pass
            elif s.request.cache == "use":
                hit = self.l1.get(s.key_hash)
                if hit is not None:
                    it.out, it.cache = hit, "l1"
                else:
                    wanted.setdefault(s.key_hash, []).append(it)
            else:
                it.cache = "miss"
        if wanted and self.l2.enabled:
            await self._from_l2(wanted)
        for its in wanted.values():
            for it in its:
                it.cache = "miss"
        if (why := self.stopped()) is not None:  # the kill switch: no miss goes to the model
            for it in group.items:
                if it.sent is None and it.cache == "miss":
                    it.reject(KILL_SWITCH, why)
                    it.cache = "none"
        for it in group.items:
            # an identical request already waiting for (or inside) the model
            # answers this one too: computed once, however many ask meanwhile
            if (
                it.cache == "miss"
                and it.serve is not None
                and it.serve.request.cache != "bypass"
                and self.coalescer.join(it)
            ):
                self.cache_metrics.coalesced.inc()
        lookup_ms = (time.perf_counter() - t0) * 1000
        for it in group.items:
            if it.sent is not None:
                continue
            if it.cache in ("miss", "coalesced"):  # these wait for the model
                it.cache_ms = lookup_ms
                if it.cache == "miss" and it.serve is not None and it.serve.request.cache == "use":
                    self.cache_metrics.misses.inc()
            else:
                await self.sender.answer_now(it, lookup_ms, len(group.items))
        self.metrics.observe_stage("cache", lookup_ms / 1000)

    async def _from_l2(self, wanted: dict[str, list[Item]]) -> None:
        """One MGET for every key L1 did not have; hits move to L1."""
        keys = list(wanted)
        refs = []
        for k in keys:
            s = wanted[k][0].serve
            assert s is not None
            refs.append(storage_key(s.model.ref, k))
        values = await self.l2.get_many(refs)
        for k, v in zip(keys, values):
            if v is not None:
                self.l1.put(k, v)
                for it in wanted.pop(k):
                    it.out, it.cache = v, "l2"
