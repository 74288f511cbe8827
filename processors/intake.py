"""Stage 1, intake: records per partition from the consumer -> Items in
their partition's batch; full or due batches go on to the lookup.

Each record is parsed, validated and keyed here, and its tokens estimated
for the batch budget. An L1 hit is answered at once (it then skips the
batch window: its latency is the broker's round trips and little else); it
stays in its batch so that it is committed in offset order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

from processors.answers import AnswerSender
from processors.batching import Batcher, PartitionBatch
from processors.cache import L1Cache
from processors.config import WorkerConfig
from processors.handoff import Handoff
from processors.items import Item, Servable
from processors.partition_state import PartitionState
from processors.runtime import ModelCard
from schemas.errors import RequestError
from schemas.keys import cache_key, normalise
from schemas.records import now_ms, parse_request

log = logging.getLogger(__name__)


class Source(Protocol):
    """What intake needs of the consumer (processors.consumer.GroupConsumer)."""

    async def getmany(self, timeout_s: float) -> dict[int, list[Any]]: ...


class Intake:
    def __init__(
        self,
        config: WorkerConfig,
        models: dict[str, ModelCard],
        batcher: Batcher[Item],
        l1: L1Cache,
        state: PartitionState,
        pending: Handoff[PartitionBatch[Item]],
        sender: AnswerSender,
    ) -> None:
        self.config = config
        self.models = models
        self.batcher = batcher
        self.l1 = l1
        self.state = state
        self.pending = pending
        self.sender = sender
        self.last_fetch = time.monotonic()

    async def run(self, source: Source, stopping: asyncio.Event, on_stop: Callable[[], int]) -> None:
        """Fetch until `stopping` is set; then `on_stop()` (drop what only
        waits in batches) and close the pending hand-off."""
        cfg, state = self.config, self.state
        while not stopping.is_set():
            self.last_fetch = time.monotonic()
            if state.full():
                state.has_room.clear()
                try:
                    await asyncio.wait_for(state.has_room.wait(), timeout=1.0)
                except TimeoutError:
                    pass
                continue
            due = self.batcher.next_due()
            if due is None:
                timeout_ms = cfg.fetch_timeout_ms
            else:
                timeout_ms = max(0, min(cfg.fetch_timeout_ms, int((due - time.monotonic()) * 1000)))
            records = await source.getmany(timeout_ms / 1000)
            for partition, msgs in records.items():
                if partition in state.assigned:
                    for it in self.take_in(partition, msgs):
                        await self.sender.answer_now(it, it.cache_ms, 1)
            self.move_ready(time.monotonic())
        # Stopping: what is with the model or the publisher finishes and is
        # committed; what only waits in batches is dropped uncommitted, so the
        # partition's next owner reads it again. Shutdown then takes one
        # batch's time, not the backlog's.
        dropped = on_stop()
        log.info("stopping: %d waiting records left for the next owner", dropped)
        self.pending.close()

    def take_in(self, partition: int, records: list[Any]) -> list[Item]:
        """Parse, key and batch a partition's records; return the L1 hits,
        to be answered at once."""
        cfg = self.config
        now, received = time.monotonic(), now_ms()
        items: list[Item] = []
        by_model: dict[str, list[Item]] = defaultdict(list)
        # tenant topics: the topic says whose requests these are, whatever they say
        tenant = cfg.topics.tenant_of(records[0].topic()) if cfg.tenant_topics and records else None
        for m in records:
            item = Item(partition, m.offset(), m.key(), m.value(), m.timestamp()[1], received)
            items.append(item)
            card = self._check(item)
            if tenant is not None:
                self._hold_to_tenant(item, tenant)
            if card is not None:
                by_model[card.name].append(item)
        shared = cfg.shared_cache_models
        for name, its in by_model.items():
            card = self.models[name]
            scope_all = name in shared
            for it in its:
                req = it.request
                assert req is not None
                key = cache_key(
                    scope="*" if scope_all else req.tenant,
                    model=card.ref,
                    task=req.task,
                    labels=req.labels,
                    text=normalise(req.input, uncased=card.uncased),
                )
                # Tokenising waits for the model process, and only for misses
                # (most requests are cache hits); the batch budget uses an
                # estimate of ~4 characters per token, capped at the model's max.
                it.serve = Servable(req, card, key, min(card.max_tokens, len(req.input) // 4 + 2))
        hits = self._l1_hits(by_model, received) if cfg.answer_l1_at_intake else []
        for it in items:
            tokens = it.serve.est_tokens if it.serve is not None else 0
            self.batcher.add(partition, it, tokens=max(1, tokens), offset=it.offset, now=now)
        return hits

    def _hold_to_tenant(self, item: Item, tenant: str) -> None:
        """The topic's tenant is the request's, and its answer goes to that
        tenant's results (or a reply topic under them): a tenant can reach
        neither another's cache nor another's results."""
        results = self.config.topics.tenant_results(tenant)
        counted = self.sender.metrics.tenant_overrides
        req = item.request
        if req is not None:
            update: dict[str, Any] = {}
            if req.tenant != tenant:
                update["tenant"] = tenant
                counted.labels("tenant").inc()
            if req.reply_to is None or not (req.reply_to == results or req.reply_to.startswith(results + ".")):
                if req.reply_to is not None:
                    counted.labels("reply_to").inc()
                update["reply_to"] = results
            if update:
                item.request = req.model_copy(update=update)
        if item.error is not None:
            item.error.reply_to = results

    def _check(self, item: Item) -> ModelCard | None:
        """The item's model if it can be served; else its error is set."""
        try:
            req = parse_request(item.raw, self.config)
        except RequestError as exc:
            item.error = exc
            return None
        item.request = req
        if req.sent_at_ms:
            item.sent_ms = req.sent_at_ms
        name = req.model or self.config.default_model
        model = self.models.get(name)
        if model is None:
            item.error = RequestError(
                f"field 'model': unknown model {name!r} (known: {', '.join(sorted(self.models))})",
                code="unknown_model",
                request_id=req.id,
                reply_to=req.reply_to,
            )
            return None
        if req.task not in model.tasks:
            item.error = RequestError(
                f"field 'task': model {name!r} does not do {req.task!r}",
                code="unsupported_task",
                request_id=req.id,
                reply_to=req.reply_to,
            )
            return None
        return model

    def _l1_hits(self, by_model: dict[str, list[Item]], received: int) -> list[Item]:
        hits: list[Item] = []
        for its in by_model.values():
            for it in its:
                s = it.serve
                assert s is not None
                req = s.request
                if req.cache != "use" or (req.deadline_ms is not None and req.deadline_ms <= received):
                    continue  # lookup decides: bypass, refresh or expired
                t0 = time.perf_counter()
                hit = self.l1.get(s.key_hash)
                if hit is not None:
                    it.out, it.cache, it.started_ms = hit, "l1", received
                    it.cache_ms = (time.perf_counter() - t0) * 1000
                    hits.append(it)
        return hits

    def move_ready(self, now: float) -> None:
        ready = self.batcher.take_ready(now)
        if ready:
            self.pending.extend(ready)
            self.state.batched(sum(len(b) for b in ready))
