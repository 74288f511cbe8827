"""Stage 4, the checkpoint: a publish round, in order, for every group the
model stage finished (several at once when they piled up):

1. results: send those not yet sent (in slices), then wait for the broker's
   acks of all of them; a reply_to that refused one gets an error result on
   the results topic instead, and that is waited for too;
2. telemetry: one record per answered request on its own producer, acked;
3. cache write-back: what the model computed goes to Redis (pipelined);
4. commit: each partition's next offset.

A failed step raises before the commit, so the round's records are read
again by the partition's next owner (at-least-once): nothing is committed
before its results are acknowledged.

Exactly-once: the round is one Kafka transaction. It opens before the first
send, every answer of the round is sent in it (none earlier), and step 4
puts the offsets into it and commits: results, telemetry and offsets become
visible to read_committed readers together, or, aborted, not at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from processors.answers import YIELD_EVERY, AnswerSender
from processors.cache import L2Cache, storage_key
from processors.consumer import CommitError
from processors.handoff import Handoff
from processors.items import Group, Item
from processors.metrics import WorkerMetrics
from processors.partition_state import PartitionState
from processors.publisher import TransactionAborted
from schemas.errors import error_label
from schemas.records import encode, now_ms, telemetry_doc

log = logging.getLogger(__name__)


class Committer(Protocol):
    """What the checkpoint needs of the consumer (processors.consumer.GroupConsumer)."""

    async def commit(self, offsets: dict[int, int]) -> None: ...

    def where(self, slot: int) -> tuple[str, int]: ...

    def topic_partitions(self, offsets: dict[int, int]) -> list[Any]: ...

    async def group_metadata(self) -> Any: ...


class Checkpoint:
    def __init__(
        self,
        *,
        sender: AnswerSender,
        l2: L2Cache,
        committer: Committer,
        state: PartitionState,
        metrics: WorkerMetrics,
        publish_max_items: int,
        transactional: bool = False,
    ) -> None:
        self.transactional = transactional
        self.sender = sender
        self.l2 = l2
        self.committer = committer
        self.state = state
        self.metrics = metrics
        self.publish_max_items = publish_max_items

    async def run(self, to_publish: Handoff[Group]) -> None:
        """Until the model stage closes `to_publish`."""

        # every group ready now goes out together, until publish_max_items
        # records: one wait for acks, one telemetry flush, one Redis
        # write-back and one commit for all of them
        while groups := await to_publish.take(self.publish_max_items, lambda g: len(g.items), whole=False):
            group = Group.merged(groups)
            try:
                await self.publish(group)
            finally:
                self.state.committed(len(group.items))

    async def publish(self, group: Group) -> None:
        sender, topics = self.sender, self.sender.topics
        t0 = time.perf_counter()
        if self.transactional:
            sender.results.begin()
        # 1. results. A model hand-off's answers come out together: hundreds,
        # with the coalesced requests that waited on them, each a few KB.
        # Sent at once they reach the broker, and every client reading the
        # results, as one burst, and the hits in flight then wait behind it;
        # a pause after every slice spreads it out (bench/RESULTS.md).
        sent = 0
        for it in group.items:
            if it.sent is None:
                await sender.pace(sent)
                it.sent = await sender.send(it)
                sent += 1
        acks = await asyncio.gather(*(_sent(it) for it in group.items), return_exceptions=True)
        retry: list[asyncio.Future] = []
        for it, ack in zip(group.items, acks, strict=True):
            if isinstance(ack, BaseException):
                if it.topic in (topics.results, topics.dlq):
                    raise ack  # the broker itself failed us: do not commit, replay later
                # a bad reply_to must not lose the answer: say so on the results topic
                log.warning("reply_to %s failed for offset %s: %s", it.topic, it.offset, ack)
                retry.append(await sender.send_fallback(it, ack))
        if retry:
            await asyncio.gather(*retry)
        # 2. telemetry
        published = now_ms()
        acked = []
        for n, it in enumerate((it for it in group.items if it.topic != topics.dlq), 1):
            acked.append(await sender.bulk.send(topics.telemetry, encode(self.telemetry(it, published))))
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*acked)
        await self._observe(group.items, published, time.perf_counter() - t0)
        # 3. cache write-back
        writes = [
            (storage_key(s.model.ref, s.key_hash), it.out)
            for it in group.computed
            if (s := it.serve) is not None and it.out is not None and s.request.cache != "bypass"
        ]
        if writes:
            await self.l2.put_many(writes)
        # 4. commit
        if self.transactional:
            await self.commit_transaction(group.offsets())
        else:
            await self.commit(group.offsets())

    def telemetry(self, it: Item, published_ms: int) -> dict[str, Any]:
        req, model = it.request, it.model
        return telemetry_doc(
            id=it.request_id or "",
            tenant=req.tenant if req else "",
            model=model.name if model else ((req.model or "") if req else ""),
            model_version=model.version if model else "",
            task=req.task if req else "",
            status=it.status,
            error_code=it.error.code if it.error is not None else "",
            cache=it.cache,
            tokens=it.tokens,
            batch_size=it.batch_size,
            worker=self.sender.worker_id,
            partition=self.committer.where(it.partition)[1],
            offset=it.offset,
            sent_at_ms=it.sent_ms,
            received_at_ms=it.received_ms,
            started_ms=it.started_ms,
            inference_start_ms=it.inference_start_ms,
            inference_end_ms=it.inference_end_ms,
            published_at_ms=published_ms,
            cache_ms=it.cache_ms,
            compute_ms=it.compute_ms,
            cost_usd=it.cost_usd,
        )

    async def _observe(self, items: list[Item], published: int, publish_s: float) -> None:
        self.metrics.count_requests(
            ((it.model.name if it.model else "unknown", it.status, it.cache) for it in items),
            (error_label(it.error) for it in items if it.error is not None),
        )
        queue, total = self.metrics.stage("queue"), self.metrics.stage("total")
        for n, it in enumerate(items, 1):
            queue.observe(max(0, it.started_ms - it.sent_ms) / 1000)
            total.observe(max(0, published - it.sent_ms) / 1000)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        self.metrics.observe_stage("publish", publish_s)

    async def commit_transaction(self, offsets: dict[int, int]) -> None:
        try:
            await self.sender.results.commit(
                self.committer.topic_partitions(offsets), await self.committer.group_metadata()
            )
        except TransactionAborted:
            self.metrics.commits.labels("aborted").inc()
            raise
        self.metrics.commits.labels("ok").inc()

    async def commit(self, offsets: dict[int, int]) -> None:
        try:
            await self.committer.commit(offsets)
            self.metrics.commits.labels("ok").inc()
        except CommitError as exc:
            # the partition moved during a rebalance: its new owner replays
            # from the last commit, so these requests are answered twice
            self.metrics.commits.labels("failed").inc()
            log.warning("commit of %s failed (%s); the new owner replays them", offsets, exc)


def _sent(it: Item) -> asyncio.Future:
    assert it.sent is not None, "every item is sent before its acks are awaited"
    return it.sent
