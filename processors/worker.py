"""The inference worker: fetch -> batch -> look up -> model -> publish -> commit.

Four stages on one event loop (the model in a process of its own), joined by
bounded hand-offs, so fetching, cache hits and publishing go on while the
model runs:

1. fetch: records per partition from the consumer (librdkafka, on a thread
   of its own: processors/consumer.py); each is parsed, validated and
   keyed, and added to its partition's batch (tokens estimated for the
   budget). Full or due batches move to the pending list. Past
   `max_pending_items` unanswered (or `max_uncommitted_items` uncommitted)
   records, fetching pauses and the backlog waits in Kafka.
2. look up: take pending batches (several partitions, up to
   `group_max_items` records), answer what needs no model at once (errors,
   expired deadlines, L1 and L2 hits: one MGET), and attach misses whose key
   is already queued or computing to that computation (coalesced).
3. model: every group queued meanwhile goes to the model process in one
   hand-off, computed in pieces of `inference_max_items` misses (shortest
   first; the model process splits a piece by a padded-token budget, one
   ONNX Runtime call per sub-batch). Each piece is answered as soon as it
   is done, with the requests that waited on its inputs.
4. publish: send the remaining results (and DLQ records), wait for the
   broker's acks, send telemetry (its own producer), wait, write new answers
   back to Redis, then commit each partition's offsets. Nothing is committed
   before its results are acknowledged.

Delivery is at-least-once: a crash between publish and commit replays the
batch, and its requests are answered again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from processors.batching import Batcher, BatchPolicy, PartitionBatch
from processors.cache import CacheMetrics, L1Cache, L2Cache, storage_key
from processors.config import WorkerConfig
from processors.consumer import CommitError, GroupConsumer
from processors.metrics import HealthServer, WorkerMetrics
from processors.model_process import Computed, Job, ModelProcess, ModelRun
from processors.publisher import Publisher
from processors.runtime import ModelCard, discover_models, load_card
from processors.scheduling import slice_problem
from schemas.errors import ConfigError, RequestError
from schemas.keys import cache_key, normalise
from schemas.records import Request, dlq_record, encode, now_ms, parse_request

log = logging.getLogger(__name__)

# Sending is CPU work on the event loop; a long run of sends yields now and
# then so that the lookup stage keeps answering cache hits meanwhile.
_YIELD_EVERY = 64


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
    model: ModelCard | None = None
    tokens: int = 0  # after tokenising (misses only)
    truncated: bool = False  # the input ran past the model's max tokens
    est_tokens: int = 0
    key_hash: str | None = None
    # outcome
    status: str = "ok"
    cache: str = "none"
    leader: "Item | None" = None
    followers: "list[Item] | None" = None  # requests waiting on this one's computation
    dropped: bool = False  # left uncommitted for the partition's next owner
    cost_usd: float = 0.0
    compute_ms: float = 0.0  # its share (by tokens) of the model's busy time
    started_ms: int = 0
    cache_ms: float = 0.0
    inference_start_ms: int = 0
    inference_end_ms: int = 0
    batch_size: int = 0
    done_ms: int = 0
    out: bytes | None = None  # the serialised output: what the cache stores
    sent: "asyncio.Future | None" = None  # ack of the result, once sent
    topic: str | None = None  # where the result went


@dataclass(slots=True)
class Group:
    """Batches of several partitions handed to the model together."""

    batches: list[PartitionBatch[Item]]
    items: list[Item] = field(default_factory=list)
    computed: list[Item] = field(default_factory=list)  # items the model ran (cache write-back)
    misses: int = 0  # items waiting for the model

    def __post_init__(self) -> None:
        self.items = [it for b in self.batches for it in b.items]
        for it in self.items:
            it.batch_size = len(self.items)

    @classmethod
    def merged(cls, groups: list["Group"]) -> "Group":
        """Several groups as one, for publishing; items keep their batch sizes."""
        if len(groups) == 1:
            return groups[0]
        g = cls.__new__(cls)
        g.batches = [b for x in groups for b in x.batches]
        g.items = [it for x in groups for it in x.items]
        g.computed = [it for x in groups for it in x.computed]
        g.misses = sum(x.misses for x in groups)
        return g

    def offsets(self) -> dict[int, int]:
        """Partition -> next offset to commit."""
        out: dict[int, int] = {}
        for b in self.batches:
            out[b.partition] = max(out.get(b.partition, 0), b.last_offset + 1)
        return out


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
        # bounded by max_pending_items through the fetch loop's pause
        self._model_queue: list[Group] = []
        self._has_model_work = asyncio.Event()
        self._lookup_done = False
        self._to_publish: asyncio.Queue[Group | None] = asyncio.Queue()
        self._inflight_items = 0  # taken from pending, not yet committed
        self._awaiting_model = 0  # cache misses queued for or inside the model
        self._computing: dict[str, Item] = {}  # key -> the miss that will compute it
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._fetch_done = False
        self._models: dict[str, ModelCard] = {}  # name -> card; the sessions live in the model process
        self._loaded = False  # the model process has loaded every model
        self._model_process = ModelProcess(config.model_nice)
        self._consumer: GroupConsumer | None = None
        self._producer: Publisher | None = None  # results
        self._bulk: Publisher | None = None  # telemetry and DLQ: volume matters
        self._health: HealthServer | None = None
        self._last_fetch = time.monotonic()
        self._assigned: set[int] = set()
        self._price_per_hour: dict[str, float] = {}
        self._cache_metrics = CacheMetrics(self.metrics.registry)
        self._l1 = L1Cache(config.l1_max_bytes, config.l1_ttl_s, self._cache_metrics)
        self._l2 = L2Cache(config.redis_url, ttl_s=config.l2_ttl_s, timeout_ms=config.redis_timeout_ms,
                           backoff_max_s=config.redis_backoff_max_s, metrics=self._cache_metrics)

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        folders = discover_models(cfg.models_dir)
        if cfg.default_model not in folders:
            hint = "; `sluice model build` makes it" if cfg.default_model == "all-minilm-l6-v2-sq8" else ""
            raise ConfigError(f"SLUICE_DEFAULT_MODEL={cfg.default_model}: no such model "
                              f"(known: {', '.join(sorted(folders))}){hint}")
        options = dict(intra_op_threads=cfg.ort_intra_op_threads, provider=cfg.ort_provider,
                       token_budget=cfg.inference_token_budget, max_items=cfg.inference_max_items,
                       allow_spinning=cfg.ort_allow_spinning)
        # the cards here (keys, tasks, prices); the sessions in the model process
        for name, folder in folders.items():
            card = self._models[name] = load_card(folder)
            price = cfg.price_per_compute_hour_usd
            self._price_per_hour[name] = card.price_per_compute_hour_usd if price is None else price
        # the model process starts and loads (a second or more) while the
        # clients connect
        loading = asyncio.ensure_future(self._model_process.load(folders, options))
        try:
            await self._connect()
            providers = await loading
        finally:
            loading.cancel()
        self._loaded = True
        for name, used in providers.items():
            log.info("model %s loaded in the model process (pid %s, nice %d): providers %s",
                     self._models[name].ref, self._model_process.pid, cfg.model_nice, used)
        self._consumer = GroupConsumer(
            cfg.bootstrap_servers, group_id=cfg.group_id, client_id=f"sluice-worker-{cfg.worker_id}",
            topic=self.topics.requests, session_timeout_ms=cfg.session_timeout_ms,
            max_poll_interval_ms=max(300_000, int(cfg.drain_timeout_s * 2000)),
            fetch_max_wait_ms=cfg.fetch_max_wait_ms, fetch_min_bytes=cfg.fetch_min_bytes,
            max_buffered=cfg.fetch_max_records,
            on_assigned=self._on_assigned, on_revoked=self._on_revoked)
        await self._consumer.start()
        # What exists now (models, tokenizers, clients, modules) lives as long
        # as the worker: frozen out of the collector's reach, a full
        # collection scans only what requests made (one took 90 ms before).
        gc.freeze()
        log.info("worker %s started in %.2f s: models %s, group %s, topic %s",
                 cfg.worker_id, time.perf_counter() - t0,
                 ", ".join(m.ref for m in self._models.values()), cfg.group_id,
                 self.topics.requests)

    async def _connect(self) -> None:
        """The metrics server, Redis and the producers."""
        cfg = self.config
        self._health = HealthServer(self.metrics, cfg.metrics_host, cfg.metrics_port,
                                    ready=self._readiness,
                                    heartbeat_age_s=lambda: time.monotonic() - self._last_fetch)
        await self._health.start()
        await self._l2.start()
        # Telemetry and DLQ records have their own producer: it lingers
        # longer (volume matters, latency does not), and a telemetry burst
        # never shares a produce request with answers.
        compression = cfg.publish_compression
        self._producer = Publisher(cfg.bootstrap_servers, client_id=f"sluice-worker-{cfg.worker_id}",
                                   linger_ms=cfg.publish_linger_ms, compression=compression)
        self._bulk = Publisher(cfg.bootstrap_servers, client_id=f"sluice-worker-{cfg.worker_id}-bulk",
                               linger_ms=max(20, cfg.publish_linger_ms), compression=compression)
        await self._producer.start()
        await self._bulk.start()
        # A first send to a topic waits for its metadata, and the fetch loop
        # (which answers L1 hits at intake) would wait with it: a new
        # worker's first answers stalled ~300 ms. Learn the topics now.
        for producer, topic in ((self._producer, self.topics.results),
                                (self._bulk, self.topics.telemetry), (self._bulk, self.topics.dlq)):
            try:
                await asyncio.wait_for(producer.partitions_for(topic), timeout=15)
            except Exception as exc:  # noqa: BLE001 -- the first send will try again
                log.warning("no metadata for topic %s yet (%s)", topic, exc)

    def _readiness(self) -> tuple[bool, str]:
        if not self._loaded:
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
        self.metrics.watch_gc(True)
        lag = asyncio.create_task(self.metrics.watch_loop(), name="loop-lag")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._fetch_loop(), name="fetch")
                tg.create_task(self._lookup_loop(), name="lookup")
                tg.create_task(self._model_loop(), name="model")
                tg.create_task(self._publish_loop(), name="publish")
        except BaseExceptionGroup as group:
            # one stage failed and the others were cancelled: raise its error
            # as itself, so the CLI can say it in one line
            raise group.exceptions[0] from None
        finally:
            lag.cancel()
            self.metrics.watch_gc(False)
            await self._close()

    async def _close(self) -> None:
        for closer in (self._consumer, self._producer, self._bulk, self._health, self._l2):
            if closer is not None:
                try:
                    await closer.stop()
                except Exception:  # closing must go on whatever one part does
                    log.exception("error while closing %s", type(closer).__name__)
        self._model_process.close()
        log.info("worker %s stopped", self.config.worker_id)

    # -- stage 1: fetch ------------------------------------------------------
    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        cfg = self.config
        while not self._stopping.is_set():
            self._last_fetch = time.monotonic()
            if (self._pending_items + self._awaiting_model >= cfg.max_pending_items
                    or self._pending_items + self._inflight_items >= cfg.max_uncommitted_items):
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
            records = await self._consumer.getmany(timeout_ms / 1000)
            for partition, msgs in records.items():
                if partition in self._assigned:
                    for it in self._intake(partition, msgs):
                        await self._answer_now(it, it.cache_ms, 1)
            self._move_ready(time.monotonic())
        # Stopping: what is with the model or the publisher finishes and is
        # committed; what only waits in batches is dropped uncommitted, so the
        # partition's next owner reads it again. Shutdown then takes one
        # batch's time, not the backlog's.
        dropped = self._drop_waiting(set(self._assigned) | {b.partition for b in self._pending}
                                     | {b.partition for g in self._model_queue for b in g.batches})
        log.info("stopping: %d waiting records left for the next owner", dropped)
        self._fetch_done = True
        self._has_pending.set()

    def _intake(self, partition: int, records: list[Any]) -> list[Item]:
        """Parse, key and queue a partition's records; return the L1 hits,
        to be answered at once (a hit then skips the batch window: its
        latency is the broker's round trips and little else)."""
        cfg = self.config
        now, received = time.monotonic(), now_ms()
        by_model: dict[str, list[Item]] = defaultdict(list)
        items: list[Item] = []
        for m in records:
            raw = m.value()
            item = Item(partition, m.offset(), m.key(), raw, m.timestamp()[1], received)
            items.append(item)
            try:
                req = parse_request(raw, cfg)
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
            elif req.task not in model.tasks:
                item.error = RequestError(f"field 'task': model {name!r} does not do {req.task!r}",
                                          code="unsupported_task", request_id=req.id,
                                          reply_to=req.reply_to)
            else:
                item.model = model
                by_model[name].append(item)
        shared = cfg.shared_cache_models
        for name, its in by_model.items():
            card = self._models[name]
            scope_all = name in shared
            for it in its:
                req = it.request
                assert req is not None
                it.key_hash = cache_key(scope="*" if scope_all else req.tenant, model=card.ref,
                                        task=req.task, labels=req.labels,
                                        text=normalise(req.input, uncased=card.uncased))
                # Tokenising waits for the model process, and only for misses
                # (most requests are cache hits); the batch budget uses an
                # estimate of ~4 characters per token, capped at the model's max.
                it.est_tokens = min(card.max_tokens, len(req.input) // 4 + 2)
        hits: list[Item] = []
        if cfg.answer_l1_at_intake:
            for its in by_model.values():
                for it in its:
                    req = it.request
                    assert req is not None and it.key_hash is not None
                    if req.cache != "use" or (req.deadline_ms is not None and req.deadline_ms <= received):
                        continue  # lookup decides: bypass, refresh or expired
                    t0 = time.perf_counter()
                    hit = self._l1.get(it.key_hash)
                    if hit is not None:
                        it.out, it.cache, it.started_ms = hit, "l1", received
                        it.cache_ms = (time.perf_counter() - t0) * 1000
                        hits.append(it)
        for it in items:
            self._batcher.add(partition, it, tokens=max(1, it.est_tokens), offset=it.offset, now=now)
        return hits

    def _move_ready(self, now: float) -> None:
        ready = self._batcher.take_ready(now)
        if ready:
            self._pending.extend(ready)
            self._pending_items += sum(len(b) for b in ready)
            self.metrics.pending.set(self._pending_items)
            self._has_pending.set()

    # -- stage 2: cache lookup; answers that need no model go out now ---------
    def _take_group(self) -> Group:
        taken: list[PartitionBatch[Item]] = []
        n = 0
        while self._pending and (not taken or n + len(self._pending[0]) <= self.config.group_max_items):
            b = self._pending.pop(0)
            taken.append(b)
            n += len(b)
        self._pending_items -= n
        self._inflight_items += n
        self._idle.clear()
        self.metrics.pending.set(self._pending_items)
        self.metrics.inflight.set(self._inflight_items)
        return Group(taken)

    async def _lookup_loop(self) -> None:
        while True:
            await self._has_pending.wait()
            if not self._pending:
                self._has_pending.clear()
                if self._fetch_done:
                    self._lookup_done = True
                    self._has_model_work.set()
                    return
                continue
            group = self._take_group()
            await self._lookup(group)
            group.misses = sum(1 for it in group.items if it.cache == "miss")
            self._awaiting_model += group.misses
            self._model_queue.append(group)
            self._has_model_work.set()

    async def _lookup(self, group: Group) -> None:
        """Errors, expired deadlines and cache hits are answered at once, so
        they never wait behind the model; the rest go on as misses."""
        started = now_ms()
        t0 = time.perf_counter()
        wanted: dict[str, list[Item]] = {}  # key -> items that may be served from cache
        for it in group.items:
            if it.sent is not None:
                continue  # answered at intake
            it.started_ms = started
            req = it.request
            if it.error is not None or req is None:
                it.status = "error"
            elif self._expired(it, started):
                pass
            elif req.cache == "use" and it.key_hash is not None:
                hit = self._l1.get(it.key_hash)
                if hit is not None:
                    it.out, it.cache = hit, "l1"
                else:
                    wanted.setdefault(it.key_hash, []).append(it)
            else:
                it.cache = "miss"
        if wanted and self._l2.enabled:
            keys = list(wanted)
            values = await self._l2.get_many(
                [storage_key(wanted[k][0].model.ref, k) for k in keys])  # type: ignore[union-attr]
            for k, v in zip(keys, values):
                if v is not None:
                    self._l1.put(k, v)
                    for it in wanted.pop(k):
                        it.out, it.cache = v, "l2"
        for its in wanted.values():
            for it in its:
                it.cache = "miss"
        for it in group.items:
            # an identical request already waiting for (or inside) the model
            # answers this one too: computed once, however many ask meanwhile
            if it.cache == "miss" and it.request is not None and it.request.cache != "bypass":
                lead = self._computing.get(it.key_hash)  # type: ignore[arg-type]
                if lead is None:
                    self._computing[it.key_hash] = it  # type: ignore[index]
                else:
                    it.leader, it.cache = lead, "coalesced"
                    if lead.followers is None:
                        lead.followers = []
                    lead.followers.append(it)
                    self._cache_metrics.coalesced.inc()
        lookup_ms = (time.perf_counter() - t0) * 1000
        for it in group.items:
            if it.sent is not None:
                continue
            if it.cache in ("miss", "coalesced"):  # these wait for the model
                it.cache_ms = lookup_ms
                if it.cache == "miss" and it.request is not None and it.request.cache == "use":
                    self._cache_metrics.misses.inc()
            else:
                await self._answer_now(it, lookup_ms, len(group.items))
        self.metrics.observe_stage("cache", lookup_ms / 1000)

    async def _answer_now(self, it: Item, lookup_ms: float, n: int) -> None:
        """Send the result of an item that needs no model (a hit, an error,
        an expired deadline); its batch commits it later, in offset order."""
        it.cache_ms = lookup_ms
        if it.cache in ("l1", "l2"):
            self._cache_metrics.hits.labels(it.cache).inc()
            it.cost_usd = self._lookup_cost(it, lookup_ms, n)
        it.done_ms = now_ms()
        it.sent = await self._send_answer(it)

    def _expired(self, it: Item, now: int) -> bool:
        req = it.request
        if req is None or req.deadline_ms is None or req.deadline_ms > now:
            return False
        it.status = "expired"
        it.error = RequestError(f"deadline {req.deadline_ms} passed before inference (now {now})",
                                code="deadline_exceeded", request_id=req.id)
        return True

    def _lookup_cost(self, it: Item, lookup_ms: float, n: int) -> float:
        name = it.model.name if it.model else self.config.default_model
        return lookup_ms / 1000 / max(1, n) * self._price_per_hour.get(name, 0.0) / 3600.0

    # -- stage 3: the model --------------------------------------------------
    async def _model_loop(self) -> None:
        while True:
            await self._has_model_work.wait()
            if not self._model_queue:
                self._has_model_work.clear()
                if self._lookup_done:
                    await self._to_publish.put(None)
                    return
                continue
            # groups queued while the model was busy go in one hand-off, up to
            # group_max_items misses
            groups, misses = [], 0
            while self._model_queue and (not groups or misses < self.config.group_max_items):
                g = self._model_queue.pop(0)
                groups.append(g)
                misses += sum(1 for it in g.items if it.cache == "miss")
            await self._infer_groups(groups)
            for g in groups:
                self._awaiting_model -= g.misses
                await self._to_publish.put(g)
            self._has_room.set()

    async def _infer_groups(self, groups: list[Group]) -> None:
        now = now_ms()
        todo: list[Item] = []
        for g in groups:
            for it in g.items:
                lead = it.leader
                if lead is not None and (lead.dropped or lead.status == "expired"):
                    # its leader will never compute: this one computes itself
                    it.leader, it.cache = None, "miss"
                    self._computing.setdefault(it.key_hash, it)  # type: ignore[arg-type]
                if it.cache != "miss" or it.status != "ok":
                    continue
                if self._expired(it, now):
                    self._release(it)
                    continue
                todo.append(it)
                g.computed.append(it)
        if todo:
            t0 = time.perf_counter()
            # A hand-off of hundreds takes the model seconds. Computed in
            # pieces of one ONNX Runtime call's rows, each piece is answered
            # as soon as it is done: its inputs move to L1 at once (later
            # requests for them are hits, not waiters), and its answers leave
            # in small bursts instead of one burst of the whole hand-off and
            # everything that waited on it, which the hits in flight then
            # queue behind. Shortest inputs first, as the model's own
            # sub-batches: a piece of like lengths pads little.
            todo.sort(key=lambda it: len(it.request.input))  # type: ignore[union-attr]
            size = self.config.inference_max_items
            pieces = [todo[i:i + size] for i in range(0, len(todo), size)]
            jobs = [[Job(it.model.name, it.request.input, it.request.task, tuple(it.request.labels or ()))  # type: ignore[union-attr]
                     for it in piece] for piece in pieces]
            done, answering = iter(pieces), 0.0
            async for computed in self._model_process.compute_pieces(jobs):
                piece = next(done)
                self._take_outcomes(piece, computed)
                t1 = time.perf_counter()
                await self._answer_computed(piece)
                answering += time.perf_counter() - t1
            self.metrics.inference.observe(time.perf_counter() - t0 - answering)
            self.metrics.batch_items.observe(len(todo))
            self._l1.update_gauges()
        for g in groups:
            for it in g.items:
                lead = it.leader
                if lead is not None:  # computed by an identical request: costs nothing more
                    it.status, it.out, it.error = lead.status, lead.out, lead.error
                    it.inference_start_ms, it.inference_end_ms = lead.inference_start_ms, lead.inference_end_ms
                if it.sent is None:
                    it.done_ms = now_ms()

    def _take_outcomes(self, piece: list[Item], computed: Computed) -> None:
        for it, o in zip(piece, computed.outcomes):
            it.tokens, it.truncated = o.tokens, o.truncated
            run = computed.runs[it.model.name]  # type: ignore[union-attr]
            it.inference_start_ms, it.inference_end_ms = run.start_ms, run.end_ms
            if o.error is not None:
                it.status = "error"
                it.error = RequestError(o.error, code="model_error", request_id=it.request.id)  # type: ignore[union-attr]
            else:
                it.out = o.out
                if it.request.cache != "bypass":  # type: ignore[union-attr]
                    self._l1.put(it.key_hash, it.out)  # type: ignore[arg-type]
            self._release(it)
        self._assign_cost(piece, computed.runs)

    async def _answer_computed(self, piece: list[Item]) -> None:
        """Send the answers of a computed piece now, with those of every
        request that waited on one of its inputs (wherever their batches
        are); their batches commit them later, in offset order. Sent in
        slices, as `_publish` does."""
        sent = 0
        for lead in piece:
            for it in (lead, *(lead.followers or ())):
                if it.sent is not None or it.dropped:
                    continue
                if it is not lead:
                    it.status, it.out, it.error = lead.status, lead.out, lead.error
                    it.inference_start_ms, it.inference_end_ms = lead.inference_start_ms, lead.inference_end_ms
                await self._between_slices(sent)
                it.done_ms = now_ms()
                it.sent = await self._send_answer(it)
                sent += 1
            lead.followers = None  # each follower points at its leader: no cycle left for the GC

    async def _between_slices(self, sent: int) -> None:
        """Called before each answer of a run sent together, with how many
        went before: a pause before every new slice of _YIELD_EVERY, none
        after the last. A gap of 0 still lets cache hits through between
        large sends."""
        if sent and sent % _YIELD_EVERY == 0:
            await asyncio.sleep(self.config.publish_slice_gap_ms / 1000)

    def _release(self, it: Item) -> None:
        if it.key_hash is not None and self._computing.get(it.key_hash) is it:
            del self._computing[it.key_hash]

    def _assign_cost(self, todo: list[Item], runs: dict[str, ModelRun]) -> None:
        """Each computed request pays its share, by tokens, of its model's
        compute seconds at the instance price; identical requests it answers
        (coalesced) pay nothing."""
        by_model: dict[str, list[Item]] = defaultdict(list)
        for it in todo:
            assert it.model is not None
            by_model[it.model.name].append(it)
        for name, its in by_model.items():
            st = runs[name]
            if st.sub_batches:
                self.metrics.batch_tokens.observe(st.padded_tokens / st.sub_batches)
            total_cost = st.seconds * self._price_per_hour[name] / 3600.0
            total_tokens = sum(it.tokens for it in its) or 1
            self.metrics.compute_seconds.inc(st.seconds)
            self.metrics.cost.labels(name).inc(total_cost)
            for it in its:
                share = it.tokens / total_tokens
                it.cost_usd = total_cost * share
                it.compute_ms = st.seconds * 1000 * share

    # -- stage 4: publish and commit ----------------------------------------
    async def _publish_loop(self) -> None:
        done = False
        while not done:
            first = await self._to_publish.get()
            if first is None:
                return
            # every group ready now goes out together: one wait for acks, one
            # telemetry flush, one Redis write-back and one commit for all of
            # them, instead of a round trip each
            groups, items = [first], len(first.items)
            while items < self.config.publish_max_items and not self._to_publish.empty():
                nxt = self._to_publish.get_nowait()
                if nxt is None:
                    done = True
                    break
                groups.append(nxt)
                items += len(nxt.items)
            group = Group.merged(groups)
            try:
                await self._publish(group)
            finally:
                self._inflight_items -= len(group.items)
                self.metrics.inflight.set(self._inflight_items)
                if self._inflight_items == 0:
                    self._idle.set()
                self._has_room.set()

    def _result(self, it: Item) -> dict[str, Any]:
        req = it.request
        model = it.model
        total = max(0, it.done_ms - it.sent_ms)
        doc: dict[str, Any] = {
            "v": 1,
            "id": req.id if req else (it.error.request_id if it.error else None),
            "status": it.status,
            "task": req.task if req else None,
            "model": model.ref if model else None,
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
        if it.truncated:
            doc["truncated"] = True  # the input ran past the model's max tokens
        if it.status == "ok" and it.out is not None:
            doc["output"] = orjson.Fragment(it.out)
        elif it.error is not None:
            doc["error"] = {"code": it.error.code, "message": it.error.message}
        return doc

    def _telemetry(self, it: Item, published_ms: int) -> dict[str, Any]:
        req, model = it.request, it.model
        return {
            "v": 1,
            "id": req.id if req else (it.error.request_id if it.error else ""),
            "tenant": req.tenant if req else "",
            "model": model.name if model else (req.model or "" if req else ""),
            "model_version": model.version if model else "",
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
            "compute_ms": round(it.compute_ms, 3),
            "cost_usd": it.cost_usd,
        }

    async def _send_answer(self, it: Item) -> asyncio.Future:
        """Send an item's result (or its DLQ record); return the ack future."""
        assert self._producer is not None
        topics = self.topics
        rid = it.request.id if it.request else (it.error.request_id if it.error else None)
        if rid is None:
            err = it.error
            reason, code = (err.message, err.code) if err else ("unreadable record", "invalid")
            doc = dlq_record(it.raw, it.key, reason, code, topic=topics.requests,
                             partition=it.partition, offset=it.offset, worker=self.config.worker_id)
            it.topic = topics.dlq
            self.metrics.dlq.inc()
            assert self._bulk is not None
            return await self._bulk.send(topics.dlq, encode(doc), key=it.key)
        it.topic = (it.request.reply_to if it.request else None) or \
            (it.error.reply_to if it.error else None) or topics.results
        return await self._producer.send(it.topic, encode(self._result(it)), key=rid.encode())

    async def _publish(self, group: Group) -> None:
        """Results -> acks -> telemetry -> acks -> cache write-back -> commit,
        in that order; a failed step raises before the commit, so the batch
        is replayed."""
        assert self._producer is not None
        producer, topics = self._producer, self.topics
        t0 = time.perf_counter()
        # A model hand-off's answers come out together: hundreds, with the
        # coalesced requests that waited on them, each a few KB. Sent at once
        # they reach the broker, and every client reading the results, as one
        # burst, and the hits in flight then wait behind it on every one of
        # them. A pause after every slice of a burst spreads it out; a
        # slice's wait is small beside a miss's (bench/RESULTS.md, session 12).
        sent = 0
        for it in group.items:
            if it.sent is None:
                await self._between_slices(sent)
                it.sent = await self._send_answer(it)
                sent += 1
        outcomes = await asyncio.gather(*(it.sent for it in group.items), return_exceptions=True)
        retry: list[asyncio.Future] = []
        for it, out in zip(group.items, outcomes):
            if isinstance(out, BaseException):
                if it.topic in (topics.results, topics.dlq):
                    raise out  # the broker itself failed us: do not commit, replay later
                # a bad reply_to must not lose the answer: say so on the results topic
                log.warning("reply_to %s failed for offset %s: %s", it.topic, it.offset, out)
                doc = self._result(it)
                doc.pop("output", None)
                doc.update(status="error",
                           error={"code": "reply_to_failed", "message": f"reply_to {it.topic}: {out}"})
                retry.append(await producer.send(topics.results, encode(doc), key=doc["id"].encode()))
        if retry:
            await asyncio.gather(*retry)
        published = now_ms()
        answered = [it for it in group.items if it.topic != topics.dlq]
        telemetry = []
        for n, it in enumerate(answered, 1):
            telemetry.append(await self._bulk.send(topics.telemetry,  # type: ignore[union-attr]
                                                   encode(self._telemetry(it, published))))
            if n % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*telemetry)
        publish_s = time.perf_counter() - t0
        items = group.items
        self.metrics.count_requests(((it.model.name if it.model else "unknown", it.status, it.cache) for it in items),
                                    (it.error.code for it in items if it.error is not None))
        queue, total = self.metrics.stage("queue"), self.metrics.stage("total")
        for n, it in enumerate(items, 1):
            queue.observe(max(0, it.started_ms - it.sent_ms) / 1000)
            total.observe(max(0, published - it.sent_ms) / 1000)
            if n % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        self.metrics.observe_stage("publish", publish_s)
        writes = [(storage_key(it.model.ref, it.key_hash), it.out) for it in group.computed  # type: ignore[union-attr]
                  if it.out is not None and it.request is not None and it.request.cache != "bypass"]
        if writes:
            await self._l2.put_many(writes)
        await self._commit(group.offsets())

    async def _commit(self, offsets: dict[int, int]) -> None:
        assert self._consumer is not None
        try:
            await self._consumer.commit(offsets)
            self.metrics.commits.labels("ok").inc()
        except CommitError as exc:
            # the partition moved during a rebalance: its new owner replays
            # from the last commit, so these requests are answered twice
            self.metrics.commits.labels("failed").inc()
            log.warning("commit of %s failed (%s); the new owner replays them", offsets, exc)

    # -- rebalance -----------------------------------------------------------
    async def _on_revoked(self, parts: set[int]) -> None:
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
        """Forget batches of these partitions that the model has not taken:
        they are uncommitted, so the partition's next owner reads them again
        (answers already sent from cache are then sent twice: at-least-once)."""
        dropped = self._batcher.drop(parts)
        keep = [b for b in self._pending if b.partition not in parts]
        dropped += self._pending_items - sum(len(b) for b in keep)
        self._pending, self._pending_items = keep, sum(len(b) for b in keep)
        queued: list[Group] = []
        for g in self._model_queue:
            for b in g.batches:
                if b.partition in parts:
                    for it in b.items:
                        it.dropped = True
                        self._release(it)
            kept = [b for b in g.batches if b.partition not in parts]
            gone = len(g.items) - sum(len(b) for b in kept)
            dropped += gone
            self._inflight_items -= gone
            self._awaiting_model -= g.misses
            if kept:
                q = Group(kept, computed=[])
                q.misses = sum(1 for it in q.items if it.cache == "miss")
                self._awaiting_model += q.misses
                queued.append(q)
        self._model_queue = queued
        if self._inflight_items == 0:
            self._idle.set()
        self.metrics.pending.set(self._pending_items)
        self.metrics.inflight.set(self._inflight_items)
        return dropped

    def _on_assigned(self, assigned: set[int]) -> None:
        self._assigned = set(assigned)
        self.metrics.assigned.set(len(self._assigned))
        log.info("assigned partitions %s", sorted(self._assigned))


async def serve(config: WorkerConfig) -> None:
    """Run one worker until SIGTERM or SIGINT, then drain and exit."""
    if config.sched_slice_us:
        # before the worker makes its threads (librdkafka's, the consumer's,
        # the executor's): they inherit it; its model process asks for the
        # default back (processors/scheduling.py says why)
        problem = slice_problem(config.sched_slice_us)
        if problem:
            log.info("worker keeps the default time slice (%s)", problem)
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
