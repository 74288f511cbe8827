"""Every answer the worker gives leaves through here: a result to the
results topic (or the request's reply_to), or a DLQ record for a record
with no usable id. Used by each stage that answers (intake's L1 hits, the
lookup's hits and errors, the model's pieces, the checkpoint's rest)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from processors.cache import CacheMetrics
from processors.items import Item
from processors.metrics import WorkerMetrics
from processors.publisher import Publisher, PublishError
from schemas.records import dlq_record, encode, now_ms, result_doc
from schemas.topics import Topics

# Sending is CPU work on the event loop; a long run of sends yields now and
# then so that the lookup stage keeps answering cache hits meanwhile.
YIELD_EVERY = 64


class AnswerSender:
    def __init__(
        self,
        *,
        topics: Topics,
        worker_id: str,
        results: Publisher,
        bulk: Publisher,
        metrics: WorkerMetrics,
        cache_metrics: CacheMetrics,
        prices: dict[str, float],
        default_model: str,
        slice_gap_ms: float,
        early: bool = True,
    ) -> None:
        self.topics = topics
        # at-least-once answers as soon as an answer exists; exactly-once
        # sends every answer in its round's transaction, with its offsets
        self.early = early
        self._topics_seen: dict[str, tuple[bool, float]] = {}  # reply_to topic -> (listed, until)
        self.worker_id = worker_id
        self.results = results  # answers: latency matters
        self.bulk = bulk  # telemetry and DLQ: volume matters
        self.metrics = metrics
        self.cache_metrics = cache_metrics
        self.prices = prices  # model name -> USD per compute hour
        self.default_model = default_model
        self.slice_gap_ms = slice_gap_ms

    def result(self, it: Item) -> dict[str, Any]:
        req, model = it.request, it.model
        return result_doc(
            id=it.request_id,
            status=it.status,
            task=req.task if req else None,
            model=model.ref if model else None,
            cache=it.cache,
            sent_ms=it.sent_ms,
            started_ms=it.started_ms,
            cache_ms=it.cache_ms,
            inference_start_ms=it.inference_start_ms,
            inference_end_ms=it.inference_end_ms,
            done_ms=it.done_ms,
            tokens=it.tokens,
            batch_size=it.batch_size,
            cost_usd=it.cost_usd,
            worker=self.worker_id,
            truncated=it.truncated,
            output=it.out,
            error_code=it.error.code if it.error is not None else None,
            error_message=it.error.message if it.error is not None else None,
        )

    async def send(self, it: Item) -> asyncio.Future:
        """Send an item's result (or its DLQ record); return the ack future."""
        topics = self.topics
        rid = it.request_id
        if rid is None:
            err = it.error
            reason, code = (err.message, err.code) if err else ("unreadable record", "invalid")
            doc = dlq_record(
                it.raw,
                it.key,
                reason,
                code,
                topic=topics.requests,
                partition=it.partition,
                offset=it.offset,
                worker=self.worker_id,
            )
            it.topic = topics.dlq
            self.metrics.dlq.inc()
            return await self.bulk.send(topics.dlq, encode(doc), key=it.key)
        it.topic = (
            (it.request.reply_to if it.request else None) or (it.error.reply_to if it.error else None) or topics.results
        )
        if not self.early and it.topic != topics.results and not await self._reply_to_known(it.topic):
            # in a transaction a refused send aborts the whole round, and
            # the round would be refused again after every restart
            failure = PublishError("not a topic this worker can write to")
            it.topic = topics.results
            return await self.send_fallback(it, failure, reply_to=it.request.reply_to if it.request else None)
        return await self.results.send(it.topic, encode(self.result(it)), key=rid.encode())

    async def _reply_to_known(self, topic: str) -> bool:
        """Whether the broker lists `topic` for this worker (remembered a minute)."""
        now = time.monotonic()
        known = self._topics_seen.get(topic)
        if known is None or known[1] < now:
            try:
                await asyncio.wait_for(self.results.partitions_for(topic), 10)
                known = (True, now + 60)
            except (PublishError, TimeoutError):
                known = (False, now + 60)
            self._topics_seen[topic] = known
        return known[0]

    async def send_fallback(self, it: Item, failure: BaseException, reply_to: str | None = None) -> asyncio.Future:
        """A reply_to topic refused the answer: say so on the results topic."""
        doc = self.result(it)
        doc.pop("output", None)
        topic = reply_to or it.topic
        doc.update(status="error", error={"code": "reply_to_failed", "message": f"reply_to {topic}: {failure}"})
        return await self.results.send(self.topics.results, encode(doc), key=doc["id"].encode())

    async def answer_now(self, it: Item, lookup_ms: float, n: int) -> None:
        """Send the result of an item that needs no model (a hit, an error,
        an expired deadline); its batch commits it later, in offset order."""
        it.cache_ms = lookup_ms
        if it.cache in ("l1", "l2"):
            self.cache_metrics.hits.labels(it.cache).inc()
            name = it.model.name if it.model else self.default_model
            it.cost_usd = lookup_ms / 1000 / max(1, n) * self.prices.get(name, 0.0) / 3600.0
        it.done_ms = now_ms()
        if self.early:
            it.sent = await self.send(it)

    async def pace(self, sent: int) -> None:
        """Called before each answer of a run sent together, with how many
        went before: a pause before every new slice of YIELD_EVERY, none
        after the last. A gap of 0 still lets cache hits through between
        large sends."""
        if sent and sent % YIELD_EVERY == 0:
            await asyncio.sleep(self.slice_gap_ms / 1000)
