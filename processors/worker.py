"""The inference worker: the wiring of four stages on one event loop (the
model in a process of its own), joined by hand-offs (processors.handoff), so
fetching, cache hits and publishing go on while the model runs:

    consumer -> Intake -> pending -> Lookup -> model_queue -> ModelStage
             -> to_publish -> Checkpoint -> commit

1. intake (processors.intake): records per partition, parsed, keyed and
   batched; L1 hits answered at once. Past `max_pending_items` unanswered
   (or `max_uncommitted_items` uncommitted) records, fetching pauses and the
   backlog waits in Kafka (processors.partition_state).
2. lookup (processors.lookup): errors, expired deadlines, L1 and L2 hits (one
   MGET) answered at once; misses of a key already computing follow it
   (processors.coalescing).
3. model (processors.inference): the misses in pieces, each answered as soon
   as it is done.
4. checkpoint (processors.checkpoint): results acked -> telemetry acked ->
   cache write-back -> commit.

Every answer leaves through one sender (processors.answers). Delivery is
at-least-once: a crash between publish and commit replays the batch, and its
requests are answered again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time

from aiokafka.errors import KafkaError

from processors.admission.control import Control, ControlView
from processors.answers import AnswerSender
from processors.batching import Batcher, BatchPolicy, PartitionBatch
from processors.cache import CacheMetrics, L1Cache, L2Cache
from processors.checkpoint import Checkpoint
from processors.coalescing import Coalescer
from processors.config import WorkerConfig
from processors.consumer import GroupConsumer
from processors.handoff import Handoff
from processors.inference import ModelStage
from processors.intake import Intake
from processors.items import Group, Item
from processors.lookup import Lookup
from processors.metrics import HealthServer, WorkerMetrics
from processors.model_process import ModelProcess
from processors.partition_state import PartitionState
from processors.publisher import Publisher, TransactionStuck
from processors.runtime import ModelCard, discover_models, load_card
from processors.scheduling import slice_problem
from schemas.errors import ConfigError
from schemas.service.tasks import supervise

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.topics = config.topics
        self.metrics = metrics or WorkerMetrics()
        self._batcher: Batcher[Item] = Batcher(
            BatchPolicy(config.batch_max_items, config.batch_max_tokens, config.batch_max_wait_ms)
        )
        self._state = PartitionState(
            self.metrics, max_pending_items=config.max_pending_items, max_uncommitted_items=config.max_uncommitted_items
        )
        self._coalescer = Coalescer()
        self._pending: Handoff[PartitionBatch[Item]] = Handoff("pending")
        self._model_queue: Handoff[Group] = Handoff("model")
        self._to_publish: Handoff[Group] = Handoff("publish")
        self._stopping = asyncio.Event()
        self._models: dict[str, ModelCard] = {}  # name -> card; the sessions live in the model process
        self._prices: dict[str, float] = {}  # name -> USD per compute hour
        self._loaded = False  # the model process has loaded every model
        self._model_process = ModelProcess(config.model_nice)
        self._control: ControlView | None = None
        self._consumer: GroupConsumer | None = None
        self._producer: Publisher | None = None  # results
        self._bulk: Publisher | None = None  # telemetry and DLQ: volume matters
        self._health: HealthServer | None = None
        self._intake: Intake | None = None
        self._created = time.monotonic()  # /healthz counts from here until the first fetch
        self._cache_metrics = CacheMetrics(self.metrics.registry)
        self._l1 = L1Cache(config.l1_max_bytes, config.l1_ttl_s, self._cache_metrics)
        self._l2 = L2Cache(
            config.redis_url,
            ttl_s=config.l2_ttl_s,
            timeout_ms=config.redis_timeout_ms,
            backoff_max_s=config.redis_backoff_max_s,
            metrics=self._cache_metrics,
            options=config.redis_options(),
        )

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        folders = discover_models(cfg.models_dir)
        if cfg.default_model not in folders:
            hint = "; `sluice model build` makes it" if cfg.default_model == "all-minilm-l6-v2-sq8" else ""
            raise ConfigError(
                f"SLUICE_DEFAULT_MODEL={cfg.default_model}: no such model (known: {', '.join(sorted(folders))}){hint}"
            )
        options = dict(
            intra_op_threads=cfg.ort_intra_op_threads,
            provider=cfg.ort_provider,
            token_budget=cfg.inference_token_budget,
            max_items=cfg.inference_max_items,
            allow_spinning=cfg.ort_allow_spinning,
        )
        # the cards here (keys, tasks, prices); the sessions in the model process
        for name, folder in folders.items():
            card = self._models[name] = load_card(folder)
            price = cfg.price_per_compute_hour_usd
            self._prices[name] = card.price_per_compute_hour_usd if price is None else price
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
            log.info(
                "model %s loaded in the model process (pid %s, nice %d): providers %s",
                self._models[name].ref,
                self._model_process.pid,
                cfg.model_nice,
                used,
            )
        self._consumer = GroupConsumer(
            cfg,
            group_id=cfg.group_id,
            client_id=f"sluice-worker-{cfg.worker_id}",
            topic=self.topics.tenant_requests_pattern if cfg.tenant_topics else self.topics.requests,
            session_timeout_ms=cfg.session_timeout_ms,
            max_poll_interval_ms=max(300_000, int(cfg.drain_timeout_s * 2000)),
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            fetch_min_bytes=cfg.fetch_min_bytes,
            max_buffered=cfg.fetch_max_records,
            on_assigned=self._on_assigned,
            on_revoked=self._on_revoked,
        )
        await self._consumer.start()
        # What exists now (models, tokenizers, clients, modules) lives as long
        # as the worker: frozen out of the collector's reach, a full
        # collection scans only what requests made (one took 90 ms before).
        gc.freeze()
        log.info(
            "worker %s started in %.2f s: models %s, group %s, topic %s",
            cfg.worker_id,
            time.perf_counter() - t0,
            ", ".join(m.ref for m in self._models.values()),
            cfg.group_id,
            self.topics.requests,
        )

    def _stopped_because(self) -> str | None:
        """Why inference is stopped (the kill switch on PREFIX.control), or None."""
        if self._control is None:
            return None
        ks = self._control.control.kill_switch
        return (ks.reason or "the kill switch is on") if ks.on else None

    async def _follow_control(self) -> None:
        """Follow PREFIX.control for the kill switch, where the topic exists
        (`sluice up` and `sluice topics` make it; a cluster without it has none)."""
        cfg = self.config
        view = ControlView(cfg, self.topics.control, on_change=self._on_control)
        try:
            await view.start_if_exists()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("kill switch not followed: %s", exc)
            return
        if view.following:
            self._control = view
            if view.control.kill_switch.on:
                log.warning("the kill switch is on: %s", view.control.kill_switch.reason)

    def _on_control(self, control: Control, key: str) -> None:
        if key == "kill_switch":
            ks = control.kill_switch
            log.warning("kill switch %s%s", "ON" if ks.on else "off", f": {ks.reason}" if ks.reason else "")

    async def _connect(self) -> None:
        """The metrics server, Redis and the producers."""
        cfg = self.config
        self._health = HealthServer(
            self.metrics,
            cfg.metrics_host,
            cfg.metrics_port,
            ready=self._readiness,
            heartbeat_age_s=self._heartbeat_age_s,
        )
        await self._health.start()
        await self._l2.start()
        await self._follow_control()
        # Telemetry and DLQ records have their own producer: it lingers
        # longer (volume matters, latency does not), and a telemetry burst
        # never shares a produce request with answers.
        # Exactly-once: one producer, since a transaction is one producer's.
        compression = cfg.publish_compression
        self._producer = Publisher(
            cfg,
            client_id=f"sluice-worker-{cfg.worker_id}",
            linger_ms=cfg.publish_linger_ms,
            compression=compression,
            transactional_id=(cfg.transactional_id or f"{cfg.group_id}-{cfg.worker_id}") if cfg.exactly_once else None,
            transaction_timeout_ms=cfg.transaction_timeout_ms,
        )
        await self._producer.start()
        if cfg.exactly_once:
            self._bulk = self._producer
        else:
            self._bulk = Publisher(
                cfg,
                client_id=f"sluice-worker-{cfg.worker_id}-bulk",
                linger_ms=max(20, cfg.publish_linger_ms),
                compression=compression,
            )
            await self._bulk.start()
        # A first send to a topic waits for its metadata, and the fetch loop
        # (which answers L1 hits at intake) would wait with it: a new
        # worker's first answers stalled ~300 ms. Learn the topics now.
        for producer, topic in (
            (self._producer, self.topics.results),
            (self._bulk, self.topics.telemetry),
            (self._bulk, self.topics.dlq),
        ):
            try:
                await asyncio.wait_for(producer.partitions_for(topic), timeout=15)
            except Exception as exc:
                log.warning("no metadata for topic %s yet (%s)", topic, exc)

    def _heartbeat_age_s(self) -> float:
        last = self._intake.last_fetch if self._intake is not None else self._created
        return time.monotonic() - last

    def _readiness(self) -> tuple[bool, str]:
        if not self._loaded:
            return False, "model not loaded"
        if self._stopping.is_set():
            return False, "stopping"
        if not self._state.assigned:
            return False, "no partitions assigned"
        return True, f"ready: {len(self._state.assigned)} partitions"

    @property
    def ready(self) -> bool:
        return self._readiness()[0]

    @property
    def metrics_port(self) -> int | None:
        return self._health.port if self._health else None

    def stop(self) -> None:
        """Ask the worker to finish: stop fetching, drain what it holds, commit."""
        self._stopping.set()
        self._state.room_made()

    def _stages(self) -> tuple[Intake, Lookup, ModelStage, Checkpoint]:
        """The stages, wired to the clients that start() made."""
        cfg, m, state = self.config, self.metrics, self._state
        assert self._producer is not None and self._bulk is not None and self._consumer is not None
        sender = AnswerSender(
            topics=self.topics,
            worker_id=cfg.worker_id,
            results=self._producer,
            bulk=self._bulk,
            metrics=m,
            cache_metrics=self._cache_metrics,
            prices=self._prices,
            default_model=cfg.default_model,
            slice_gap_ms=cfg.publish_slice_gap_ms,
            early=not cfg.exactly_once,
        )
        intake = Intake(cfg, self._models, self._batcher, self._l1, state, self._pending, sender)
        lookup = Lookup(
            group_max_items=cfg.group_max_items,
            l1=self._l1,
            l2=self._l2,
            coalescer=self._coalescer,
            sender=sender,
            state=state,
            metrics=m,
            cache_metrics=self._cache_metrics,
            stopped=self._stopped_because,
        )
        model = ModelStage(
            model=self._model_process,
            group_max_items=cfg.group_max_items,
            inference_max_items=cfg.inference_max_items,
            l1=self._l1,
            coalescer=self._coalescer,
            sender=sender,
            state=state,
            metrics=m,
            prices=self._prices,
            stopped=self._stopped_because,
        )
        checkpoint = Checkpoint(
            sender=sender,
            l2=self._l2,
            committer=self._consumer,
            state=state,
            metrics=m,
            publish_max_items=cfg.publish_max_items,
            transactional=cfg.exactly_once,
        )
        return intake, lookup, model, checkpoint

    async def run(self) -> None:
        """Run until `stop()`; then drain and close. Raises if a stage fails."""
        self.metrics.watch_gc(True)
        # a metric only: if it fails, it is logged and the worker goes on
        lag = supervise(self.metrics.watch_loop(), name="loop-lag")
        try:
            assert self._consumer is not None, "start() first"
            intake, lookup, model, checkpoint = self._stages()
            self._intake = intake
            async with asyncio.TaskGroup() as tg:
                tg.create_task(intake.run(self._consumer, self._stopping, self._drop_all), name="fetch")
                tg.create_task(lookup.run(self._pending, self._model_queue), name="lookup")
                tg.create_task(model.run(self._model_queue, self._to_publish), name="model")
                tg.create_task(checkpoint.run(self._to_publish), name="publish")
        except BaseExceptionGroup as group:
            # one stage failed and the others were cancelled: raise its error
            # as itself, so the CLI can say it in one line
            first = group.exceptions[0]
            if isinstance(first, TransactionStuck):
                _end_process(first)
            raise first from None
        finally:
            lag.cancel()
            self.metrics.watch_gc(False)
            await self._close()

    async def _close(self) -> None:
        bulk = self._bulk if self._bulk is not self._producer else None
        for closer in (self._consumer, self._producer, bulk, self._health, self._l2, self._control):
            if closer is not None:
                try:
                    await closer.stop()
                except Exception:  # closing must go on whatever one part does
                    log.exception("error while closing %s", type(closer).__name__)
        self._model_process.close()
        log.info("worker %s stopped", self.config.worker_id)

    # -- rebalance -----------------------------------------------------------
    def _drop(self, parts: set[int]) -> int:
        return self._state.drop(parts, self._batcher, self._pending, self._model_queue, self._coalescer)

    def _drop_all(self) -> int:
        """At stop: every partition's records that only wait in batches."""
        parts = (
            set(self._state.assigned)
            | {b.partition for b in self._pending}
            | {b.partition for g in self._model_queue for b in g.batches}
        )
        return self._drop(parts)

    async def _on_revoked(self, parts: set[int]) -> None:
        self._state.assigned -= parts
        self.metrics.rebalances.inc()
        dropped = self._drop(parts)
        # what is already with the model or the publisher finishes and commits
        # while we still own the partitions
        try:
            await asyncio.wait_for(self._state.idle.wait(), timeout=self.config.drain_timeout_s)
        except TimeoutError:
            log.warning("revoke: batches still in flight after %.0f s", self.config.drain_timeout_s)
        log.info("revoked %s (dropped %d uncommitted records for the next owner)", sorted(parts), dropped)

    def _on_assigned(self, assigned: set[int]) -> None:
        self._state.assigned = set(assigned)
        self.metrics.assigned.set(len(self._state.assigned))
        log.info("assigned partitions %s", sorted(self._state.assigned))


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
    loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
    await running


def _end_process(exc: TransactionStuck) -> None:
    """A thread is stuck inside librdkafka: closing the producer would wait
    for it for ever, so the process ends here. Nothing is lost: what was not
    committed is read again by the partitions' next owner."""
    log.critical("%s: ending the process (a restart resumes from the last committed transaction)", exc)
    print(f"sluice worker: {exc}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(70)


def _log_tasks() -> None:
    """SIGUSR1: where every task of the worker waits, in its log (py-spy
    sees the event loop idle, not the coroutine that waits)."""
    import io

    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())
