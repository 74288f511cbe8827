"""The inference worker: fetch -> batch -> model -> publish -> commit.

Three stages joined by bounded hand-offs, so the event loop keeps fetching
and publishing while the model runs in its own thread:

1. fetch: `getmany()` records per partition, parse and tokenise them, and
   add them to that partition's batch; batches that are full or due move to
   the pending list (bounded: past `max_pending_items` fetching pauses).
2. process: take every pending batch (up to `group_max_items` records, from
   any partitions), answer what needs no model (errors, expired deadlines,
   in-batch repeats), and run the unique rest through ONNX Runtime in one
   hand-off to the model thread.
3. publish: send results (and DLQ records), wait for the broker's acks,
   send telemetry, wait for acks, then commit each partition's offsets.
   Nothing is committed before its results are acknowledged.

Delivery is at-least-once: a crash between publish and commit replays the
batch, and its requests are answered again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from processors.batching import Batcher, BatchPolicy, PartitionBatch
from processors.config import WorkerConfig
from processors.metrics import HealthServer, WorkerMetrics
from processors.runtime import Encoded, ModelRuntime, RunStats, discover_models
from schemas.errors import ConfigError, RequestError
from schemas.keys import cache_key, normalise
from schemas.records import Request, dlq_record, encode, now_ms, parse_request

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Item:
    """One record on its way through the worker, and its outcome."""

    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    sent_ms: int
    received_ms: int
    request: Request | None = None
    error: RequestError | None = None
    model: ModelRuntime | None = None
    encoded: Encoded | None = None
    key_hash: str | None = None
    # outcome
    status: str = "ok"
    output: dict[str, Any] | None = None
    cache: str = "none"
    leader: "Item | None" = None
    followers: int = 0
    cost_usd: float = 0.0
    started_ms: int = 0
    cache_ms: float = 0.0
    inference_start_ms: int = 0
    inference_end_ms: int = 0
    batch_size: int = 0
    done_ms: int = 0

    @property
    def tokens(self) -> int:
        return self.encoded.tokens if self.encoded is not None else 0


@dataclass(slots=True)
class Group:
    """Batches of several partitions handed to the model together."""

    batches: list[PartitionBatch[Item]]
    items: list[Item] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.items = [it for b in self.batches for it in b.items]

    def offsets(self) -> dict[int, int]:
        """Partition -> next offset to commit."""
        out: dict[int, int] = {}
        for b in self.batches:
            out[b.partition] = max(out.get(b.partition, 0), b.last_offset + 1)
        return out


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "Worker") -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._worker._on_assigned(assigned)


class Worker:
    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.topics = config.topics
        self.metrics = metrics or WorkerMetrics()
        self._policy = BatchPolicy(config.batch_max_items, config.batch_max_tokens,
                                   config.batch_max_wait_ms)
        self._batcher: Batcher[Item] = Batcher(self._policy)
        self._pending: list[PartitionBatch[Item]] = []
        self._pending_items = 0
        self._has_pending = asyncio.Event()
        self._has_room = asyncio.Event()
        self._to_publish: asyncio.Queue[Group | None] = asyncio.Queue(maxsize=1)
        self._inflight_items = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._fetch_done = False
        self._models: dict[str, ModelRuntime] = {}
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-model")
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._health: HealthServer | None = None
        self._last_fetch = time.monotonic()
        self._assigned: set[int] = set()
        self._price_per_hour: dict[str, float] = {}

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        folders = discover_models(cfg.models_dir)
        if cfg.default_model not in folders:
            raise ConfigError(f"SLUICE_DEFAULT_MODEL={cfg.default_model}: no such model "
                              f"(known: {', '.join(sorted(folders))})")
        for name, folder in folders.items():
            rt = ModelRuntime(folder, intra_op_threads=cfg.ort_intra_op_threads,
                              provider=cfg.ort_provider, token_budget=cfg.inference_token_budget,
                              max_items=cfg.inference_max_items,
                              allow_spinning=cfg.ort_allow_spinning)
            self._models[name] = await loop.run_in_executor(self._model_thread, rt.load)
            price = cfg.price_per_compute_hour_usd
            self._price_per_hour[name] = rt.card.price_per_compute_hour_usd if price is None else price
        self._health = HealthServer(self.metrics, cfg.metrics_host, cfg.metrics_port,
                                    ready=self._readiness,
                                    heartbeat_age_s=lambda: time.monotonic() - self._last_fetch)
        await self._health.start()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=f"sluice-worker-{cfg.worker_id}",
            acks="all", enable_idempotence=True, linger_ms=2, max_batch_size=1 << 20,
            max_request_size=4 << 20)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers, group_id=cfg.group_id,
            client_id=f"sluice-worker-{cfg.worker_id}", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=max(1000, cfg.session_timeout_ms // 4),
            max_poll_interval_ms=max(300_000, int(cfg.drain_timeout_s * 2000)),
            fetch_max_wait_ms=cfg.fetch_timeout_ms, max_partition_fetch_bytes=4 << 20)
        await self._consumer.start()
        self._consumer.subscribe([self.topics.requests], listener=_Rebalance(self))
        log.info("worker %s started in %.2f s: models %s, group %s, topic %s",
                 cfg.worker_id, time.perf_counter() - t0,
                 ", ".join(m.card.ref for m in self._models.values()), cfg.group_id,
                 self.topics.requests)

    def _readiness(self) -> tuple[bool, str]:
        if not self._models:
            return False, "model not loaded"
        if self._stopping.is_set():
            return False, "stopping"
        if not self._assigned:
            return False, "no partitions assigned"
        return True, f"ready: {len(self._assigned)} partitions"

    @property
    def ready(self) -> bool:
        return self._readiness()[0]

    @property
    def metrics_port(self) -> int | None:
        return self._health.port if self._health else None

    def stop(self) -> None:
        """Ask the worker to finish: stop fetching, drain what it holds, commit."""
        self._stopping.set()
        self._has_pending.set()
        self._has_room.set()

    async def run(self) -> None:
        """Run until `stop()`; then drain and close. Raises if a stage fails."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._fetch_loop(), name="fetch")
                tg.create_task(self._process_loop(), name="process")
                tg.create_task(self._publish_loop(), name="publish")
        finally:
            await self._close()

    async def _close(self) -> None:
        for closer in (self._consumer, self._producer, self._health):
            if closer is not None:
                try:
                    await closer.stop()
                except Exception:  # closing must go on whatever one part does
                    log.exception("error while closing %s", type(closer).__name__)
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self.config.worker_id)

    # -- stage 1: fetch ------------------------------------------------------
    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        cfg = self.config
        while not self._stopping.is_set():
            self._last_fetch = time.monotonic()
            if self._pending_items >= cfg.max_pending_items:
                self._has_room.clear()
                try:
                    await asyncio.wait_for(self._has_room.wait(), timeout=1.0)
                except TimeoutError:
                    pass
                continue
            due = self._batcher.next_due()
            if due is None:
                timeout_ms = cfg.fetch_timeout_ms
            else:
                timeout_ms = max(0, min(cfg.fetch_timeout_ms, int((due - time.monotonic()) * 1000)))
            records = await self._consumer.getmany(timeout_ms=timeout_ms,
                                                   max_records=cfg.fetch_max_records)
            for tp, recs in records.items():
                if tp.partition in self._assigned:
                    self._intake(tp.partition, recs)
            self._move_ready(time.monotonic())
        # Stopping: what is with the model or the publisher finishes and is
        # committed; what only waits in batches is dropped uncommitted, so the
        # partition's next owner reads it again. Shutdown then takes one
        # batch's time, not the backlog's.
        dropped = self._drop_waiting(set(self._assigned) | {b.partition for b in self._pending})
        log.info("stopping: %d waiting records left for the next owner", dropped)
        self._fetch_done = True
        self._has_pending.set()

    def _intake(self, partition: int, records: list[Any]) -> None:
        cfg = self.config
        now, received = time.monotonic(), now_ms()
        by_model: dict[str, list[Item]] = defaultdict(list)
        items: list[Item] = []
        for rec in records:
            item = Item(partition, rec.offset, rec.key, rec.value, rec.timestamp, received)
            items.append(item)
            try:
                req = parse_request(rec.value, cfg)
            except RequestError as exc:
                item.error = exc
                continue
            item.request = req
            if req.sent_at_ms:
                item.sent_ms = req.sent_at_ms
            name = req.model or cfg.default_model
            model = self._models.get(name)
            if model is None:
                item.error = RequestError(f"field 'model': unknown model {name!r} (known: "
                                          f"{', '.join(sorted(self._models))})", code="unknown_model",
                                          request_id=req.id, reply_to=req.reply_to)
            elif req.task not in model.card.tasks:
                item.error = RequestError(f"field 'task': model {name!r} does not do {req.task!r}",
                                          code="unsupported_task", request_id=req.id,
                                          reply_to=req.reply_to)
            else:
                item.model = model
                by_model[name].append(item)
        for name, its in by_model.items():
            model = self._models[name]
            uncased = model.card.uncased
            for it, enc in zip(its, model.encode([it.request.input for it in its])):  # type: ignore[union-attr]
                it.encoded = enc
                req = it.request
                assert req is not None
                it.key_hash = cache_key(scope=req.tenant, model=model.card.ref, task=req.task,
                                        labels=req.labels, text=normalise(req.input, uncased=uncased))
        for it in items:
            self._batcher.add(partition, it, tokens=max(1, it.tokens), offset=it.offset, now=now)

    def _move_ready(self, now: float) -> None:
        ready = self._batcher.take_ready(now)
        if ready:
            self._pending.extend(ready)
            self._pending_items += sum(len(b) for b in ready)
            self.metrics.pending.set(self._pending_items)
            self._has_pending.set()

    # -- stage 2: process ----------------------------------------------------
    def _take_group(self) -> Group:
        taken: list[PartitionBatch[Item]] = []
        n = 0
        while self._pending and (not taken or n + len(self._pending[0]) <= self.config.group_max_items):
            b = self._pending.pop(0)
            taken.append(b)
            n += len(b)
        self._pending_items -= n
        self.metrics.pending.set(self._pending_items)
        self._has_room.set()
        return Group(taken)

    async def _process_loop(self) -> None:
        while True:
            await self._has_pending.wait()
            if not self._pending:
                self._has_pending.clear()
                if self._fetch_done:
                    await self._to_publish.put(None)
                    return
                continue
            group = self._take_group()
            self._inflight_items += len(group.items)
            self._idle.clear()
            self.metrics.inflight.set(self._inflight_items)
            await self._process(group)
            await self._to_publish.put(group)

    async def _process(self, group: Group) -> None:
        started = now_ms()
        leaders: dict[str, Item] = {}
        todo: list[Item] = []
        for it in group.items:
            it.started_ms = started
            it.batch_size = len(group.items)
            req = it.request
            if it.error is not None or req is None:
                it.status = "error"
                continue
            if req.deadline_ms is not None and req.deadline_ms <= started:
                it.status = "expired"
                it.error = RequestError(f"deadline {req.deadline_ms} passed before inference "
                                        f"(now {started})", code="deadline_exceeded",
                                        request_id=req.id)
                continue
            if req.cache != "bypass" and it.key_hash is not None:
                leader = leaders.get(it.key_hash)
                if leader is not None:
                    it.leader = leader
                    leader.followers += 1
                    it.cache = "coalesced"
                    continue
                leaders[it.key_hash] = it
            it.cache = "miss"
            todo.append(it)

        if todo:
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            stats = await loop.run_in_executor(self._model_thread, self._infer, todo)
            self.metrics.inference.observe(time.perf_counter() - t0)
            self.metrics.batch_items.observe(len(todo))
            self._assign_cost(todo, stats)
        for it in group.items:
            if it.leader is not None:
                lead = it.leader
                it.status, it.output, it.error = lead.status, lead.output, lead.error
                it.inference_start_ms, it.inference_end_ms = lead.inference_start_ms, lead.inference_end_ms
                it.cost_usd = lead.cost_usd
        for it in group.items:
            it.done_ms = now_ms()

    def _infer(self, todo: list[Item]) -> dict[str, RunStats]:
        """On the model thread: one embed call per model over all its misses,
        then classify heads. A model failure fails its items, not the worker."""
        by_model: dict[str, list[Item]] = defaultdict(list)
        for it in todo:
            assert it.model is not None
            by_model[it.model.card.name].append(it)
        all_stats: dict[str, RunStats] = {}
        for name, its in by_model.items():
            model = self._models[name]
            stats = all_stats[name] = RunStats()
            start = now_ms()
            try:
                vectors = model.embed_encoded([it.encoded for it in its], stats)  # type: ignore[misc]
                for it, vec in zip(its, vectors):
                    req = it.request
                    assert req is not None
                    if req.task == "classify":
                        labels = list(req.labels or ())
                        it.output = model.classify(vec, labels, model.label_embeddings(labels, stats))
                    else:
                        it.output = {"embedding": vec}
            except Exception as exc:  # ONNX Runtime raises untyped errors
                log.exception("model %s failed on %d items", name, len(its))
                for it in its:
                    it.status = "error"
                    it.error = RequestError(f"model {name} failed: {exc}", code="model_error",
                                            request_id=it.request.id if it.request else None)
            end = now_ms()
            for it in its:
                it.inference_start_ms, it.inference_end_ms = start, end
            if stats.sub_batches:
                self.metrics.batch_tokens.observe(stats.padded_tokens / stats.sub_batches)
        return all_stats

    def _assign_cost(self, todo: list[Item], stats: dict[str, RunStats]) -> None:
        """Each computed request pays its share, by tokens, of its model's
        compute seconds at the instance price; in-batch repeats split it."""
        by_model: dict[str, list[Item]] = defaultdict(list)
        for it in todo:
            assert it.model is not None
            by_model[it.model.card.name].append(it)
        for name, its in by_model.items():
            st = stats[name]
            total_cost = st.seconds * self._price_per_hour[name] / 3600.0
            total_tokens = sum(it.tokens for it in its) or 1
            self.metrics.compute_seconds.inc(st.seconds)
            self.metrics.cost.labels(name).inc(total_cost)
            for it in its:
                it.cost_usd = total_cost * it.tokens / total_tokens / (1 + it.followers)

    # -- stage 3: publish and commit ----------------------------------------
    async def _publish_loop(self) -> None:
        while True:
            group = await self._to_publish.get()
            if group is None:
                return
            try:
                await self._publish(group)
            finally:
                self._inflight_items -= len(group.items)
                self.metrics.inflight.set(self._inflight_items)
                if self._inflight_items == 0:
                    self._idle.set()

    def _result(self, it: Item) -> dict[str, Any]:
        req = it.request
        model = it.model
        total = max(0, it.done_ms - it.sent_ms)
        doc: dict[str, Any] = {
            "v": 1,
            "id": req.id if req else (it.error.request_id if it.error else None),
            "status": it.status,
            "task": req.task if req else None,
            "model": model.card.ref if model else None,
            "cache": it.cache,
            "timings_ms": {
                "queue": max(0, it.started_ms - it.sent_ms),
                "cache": round(it.cache_ms, 3),
                "inference": max(0, it.inference_end_ms - it.inference_start_ms),
                "total": total,
            },
            "tokens": it.tokens,
            "batch_size": it.batch_size,
            "cost_usd": it.cost_usd,
            "worker": self.config.worker_id,
        }
        if it.encoded is not None and it.encoded.truncated:
            doc["truncated"] = True  # the input ran past the model's max tokens
        if it.status == "ok":
            doc["output"] = it.output
        elif it.error is not None:
            doc["error"] = {"code": it.error.code, "message": it.error.message}
        return doc

    def _telemetry(self, it: Item, published_ms: int) -> dict[str, Any]:
        req, model = it.request, it.model
        return {
            "v": 1,
            "id": req.id if req else (it.error.request_id if it.error else ""),
            "tenant": req.tenant if req else "",
            "model": model.card.name if model else (req.model or "" if req else ""),
            "model_version": model.card.version if model else "",
            "task": req.task if req else "",
            "status": it.status,
            "error_code": it.error.code if it.error is not None else "",
            "cache": it.cache,
            "tokens": it.tokens,
            "batch_size": it.batch_size,
            "worker": self.config.worker_id,
            "partition": it.partition,
            "offset": it.offset,
            "sent_at_ms": it.sent_ms,
            "received_at_ms": it.received_ms,
            "inference_start_ms": it.inference_start_ms,
            "inference_end_ms": it.inference_end_ms,
            "published_at_ms": published_ms,
            "queue_ms": max(0, it.started_ms - it.sent_ms),
            "cache_ms": it.cache_ms,
            "inference_ms": max(0, it.inference_end_ms - it.inference_start_ms),
            "total_ms": max(0, published_ms - it.sent_ms),
            "cost_usd": it.cost_usd,
        }

    async def _publish(self, group: Group) -> None:
        """Results -> acks -> telemetry -> acks -> commit, in that order; a
        failed step raises before the commit, so the batch is replayed."""
        assert self._producer is not None and self._consumer is not None
        producer, topics = self._producer, self.topics
        t0 = time.perf_counter()
        sends: list[tuple[Item, str, asyncio.Future]] = []
        answered: list[Item] = []
        for it in group.items:
            rid = it.request.id if it.request else (it.error.request_id if it.error else None)
            if rid is None:
                err = it.error
                reason, code = (err.message, err.code) if err else ("unreadable record", "invalid")
                doc = dlq_record(it.raw, it.key, reason, code, topic=topics.requests,
                                 partition=it.partition, offset=it.offset, worker=self.config.worker_id)
                fut = await producer.send(topics.dlq, encode(doc), key=it.key)
                sends.append((it, topics.dlq, fut))
                self.metrics.dlq.inc()
                self.metrics.errors.labels(code).inc()
                continue
            reply_to = (it.request.reply_to if it.request else None) or \
                       (it.error.reply_to if it.error else None) or topics.results
            fut = await producer.send(reply_to, encode(self._result(it)), key=rid.encode())
            sends.append((it, reply_to, fut))
            answered.append(it)
        outcomes = await asyncio.gather(*(f for _, _, f in sends), return_exceptions=True)
        retry: list[asyncio.Future] = []
        for (it, topic, _), out in zip(sends, outcomes):
            if isinstance(out, BaseException):
                if topic in (topics.results, topics.dlq):
                    raise out  # the broker itself failed us: do not commit, replay later
                # a bad reply_to must not lose the answer: say so on the results topic
                log.warning("reply_to %s failed for %s: %s", topic, it.offset, out)
                doc = self._result(it)
                doc.update(status="error", output=None,
                           error={"code": "reply_to_failed", "message": f"reply_to {topic}: {out}"})
                retry.append(await producer.send(topics.results, encode(doc), key=doc["id"].encode()))
        if retry:
            await asyncio.gather(*retry)
        published = now_ms()
        telemetry = [await producer.send(topics.telemetry, encode(self._telemetry(it, published)))
                     for it in answered]
        await asyncio.gather(*telemetry)
        publish_s = time.perf_counter() - t0
        for it in group.items:
            model = it.model.card.name if it.model else "unknown"
            self.metrics.requests.labels(model, it.status, it.cache).inc()
            if it.error is not None and it.request is not None:
                self.metrics.errors.labels(it.error.code).inc()
            self.metrics.observe_stage("queue", max(0, it.started_ms - it.sent_ms) / 1000)
            self.metrics.observe_stage("total", max(0, published - it.sent_ms) / 1000)
        self.metrics.observe_stage("publish", publish_s)
        await self._commit(group.offsets())

    async def _commit(self, offsets: dict[int, int]) -> None:
        assert self._consumer is not None
        tps = {TopicPartition(self.topics.requests, p): off for p, off in offsets.items()}
        try:
            await self._consumer.commit(tps)
            self.metrics.commits.labels("ok").inc()
        except (CommitFailedError, IllegalStateError) as exc:
            # the partition moved during a rebalance: its new owner replays
            # from the last commit, so these requests are answered twice
            self.metrics.commits.labels("failed").inc()
            log.warning("commit of %s failed (%s); the new owner replays them", offsets, exc)

    # -- rebalance -----------------------------------------------------------
    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        parts = {tp.partition for tp in revoked if tp.topic == self.topics.requests}
        self._assigned -= parts
        self.metrics.rebalances.inc()
        dropped = self._drop_waiting(parts)
        # what is already with the model or the publisher finishes and commits
        # while we still own the partitions
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.config.drain_timeout_s)
        except TimeoutError:
            log.warning("revoke: batches still in flight after %.0f s", self.config.drain_timeout_s)
        log.info("revoked %s (dropped %d uncommitted records for the next owner)", sorted(parts), dropped)

    def _drop_waiting(self, parts: set[int]) -> int:
        """Forget batches of these partitions that the model has not taken."""
        dropped = self._batcher.drop(parts)
        keep = [b for b in self._pending if b.partition not in parts]
        dropped += self._pending_items - sum(len(b) for b in keep)
        self._pending, self._pending_items = keep, sum(len(b) for b in keep)
        self.metrics.pending.set(self._pending_items)
        return dropped

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        self._assigned = {tp.partition for tp in (self._consumer.assignment() if self._consumer else ())
                          if tp.topic == self.topics.requests}
        self.metrics.assigned.set(len(self._assigned))
        log.info("assigned partitions %s", sorted(self._assigned))


async def serve(config: WorkerConfig) -> None:
    """Run one worker until SIGTERM or SIGINT, then drain and exit."""
    worker = Worker(config)
    loop = asyncio.get_running_loop()
    await worker.start()
    running = asyncio.create_task(worker.run(), name="worker")

    def on_signal() -> None:
        worker.stop()
        # a drain that outlives its budget is cut short: what it did not
        # commit is replayed by the next owner
        loop.call_later(config.drain_timeout_s, running.cancel)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await running
