"""The ClickHouse sink: PREFIX.telemetry and PREFIX.autoscale -> batches -> ClickHouse -> commit.

Each topic has its table (telemetry; autoscale_events, the autoscaler's
decisions) and buffers are kept per topic-partition, so everything below
holds for both.

Records are read per partition and buffered; a flush happens when
`sink_batch_max_rows` records are buffered or `sink_batch_max_s` has passed
since the batch's first record. A flush inserts one block per partition and
commits that partition's offsets only after its insert succeeded. A store
that fails is retried with exponential backoff (up to `sink_retry_max_s`
between tries) and nothing is committed meanwhile. An unparseable record is
logged, counted (sluice_sink_errors_total{kind="bad_record"}) and skipped;
its offset is committed with the rest.

Exactly-once rows, with at-least-once delivery
-----------------------------------------------
Each block carries the deduplication token f"{topic}:{partition}:{first}-{last}"
(offsets of its first and last record), and ClickHouse drops a block whose
token it has already stored (the base table and the per-minute rollup each
keep a deduplication window). That only helps if a replay after a crash cuts
the SAME blocks as the run that crashed: a crash between insert and commit
replays from the last commit, and the fetch sizes and timers of the new run
will not cut where the old one did (a block [100-437] replayed as [100-2000]
has a new token, and rows 100-437 would be stored twice).

Fixed offset boundaries (blocks at multiples of N) make full blocks
deterministic but not the partial ones a timer flushes at low rates, which
is exactly when a sink spends most of its time. So the cut is written down
before the insert instead: a flush first commits, per partition, the
offset it starts from (unchanged) with the metadata "sluice-sink:cut=LAST",
then inserts, then commits LAST+1. A sink that gets the partition (after a
restart or a rebalance) reads that metadata and makes its first block
exactly [committed, LAST]; the same records give the same token and
ClickHouse drops the repeat. One extra offset commit per flush (a few ms,
once a second at most by default) buys exactly-once rows on either back end.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.errors import error_label
from schemas.service.http import HealthServer
from sinks.config import SinkConfig
from sinks.errors import SinkError
from sinks.query_endpoint import QueryEndpoint
from sinks.rows import BadRecord, decision_row, to_row
from sinks.store import Store, open_store

log = logging.getLogger(__name__)

CUT_PREFIX = "sluice-sink:cut="
_INSERT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.rows = Counter("sluice_sink_rows_total", "Telemetry rows inserted.", registry=r)
        self.inserts = Counter(
            "sluice_sink_inserts_total", "Blocks inserted (one per partition and flush).", registry=r
        )
        self.insert_seconds = Histogram(
            "sluice_sink_insert_seconds", "Time of one flush's inserts.", buckets=_INSERT_BUCKETS, registry=r
        )
        self.errors = Counter(
            "sluice_sink_errors_total",
            "Failures: bad_record (skipped), insert (retried), commit.",
            ["kind"],
            registry=r,
        )
        self.lag = Gauge("sluice_sink_lag_records", "Telemetry records in the topic not yet stored.", registry=r)
        self.buffered = Gauge("sluice_sink_buffered_rows", "Records read and not yet inserted.", registry=r)
        self.assigned = Gauge("sluice_sink_assigned_partitions", "Partitions this sink owns.", registry=r)
        self.queries = Counter(
            "sluice_sink_queries_total",
            "POST /query calls: ok, refused (not allowed or failed), busy, error.",
            ["outcome"],
            registry=r,
        )


@dataclass(slots=True)
class PartBuf:
    """One partition's records read and not yet committed."""

    first_offset: int = -1
    last_offset: int = -1
    rows: list[tuple[int, bytes | None]] = field(default_factory=list)  # (offset, row or None if bad)
    since: float = 0.0  # monotonic time of the first record
    cut: int | None = None  # a previous owner's planned end of the first block

    def add(self, offset: int, row: bytes | None, now: float) -> None:
        if not self.rows:
            self.first_offset, self.since = offset, now
        self.rows.append((offset, row))
        self.last_offset = offset

    def take(self, end: int) -> list[tuple[int, bytes | None]]:
        """Records with offset <= end, removed from the buffer."""
        n = 0
        while n < len(self.rows) and self.rows[n][0] <= end:
            n += 1
        taken, self.rows = self.rows[:n], self.rows[n:]
        if self.rows:
            self.first_offset = self.rows[0][0]
            self.since = time.monotonic()
        else:
            self.first_offset = self.last_offset = -1
        return taken


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, sink: TelemetrySink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._sink._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._sink._on_assigned(assigned)


class TelemetrySink:
    def __init__(self, config: SinkConfig, metrics: SinkMetrics | None = None, store: Store | None = None) -> None:
        self.config = config
        topics = config.topics
        # topic -> (table, record-to-row)
        self._tables: dict[str, tuple[str, Callable[[bytes | None], bytes]]] = {
            topics.telemetry: ("telemetry", to_row),
            topics.autoscale: ("autoscale_events", decision_row),
        }
        self.metrics = metrics or SinkMetrics()
        self.store: Store = store or open_store(config)
        self._bufs: dict[TopicPartition, PartBuf] = {}
        self._assigned: set[TopicPartition] = set()
        self._stopping = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._http: HealthServer | None = None
        self._store_ready = False
        self._last_fetch = time.monotonic()
        self._committed: dict[TopicPartition, int] = {}
        self.port: int | None = None
        # One thread owns the store: a chDB session is not to be used from
        # two threads at once (an insert and a POST /query would otherwise).
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-sink-db")
        self._query = QueryEndpoint(config, self.store, self.metrics.queries, lambda: self._store_ready)

    async def _in_db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        await self._in_db(self.store.start)
        self._store_ready = True
        await self._start_http()
        self._admin = AIOKafkaAdminClient(**cfg.aiokafka(), client_id="sluice-sink-admin")
        await self._admin.start()
        self._consumer = AIOKafkaConsumer(
            **cfg.aiokafka(),
            group_id=cfg.sink_group_id,
            client_id="sluice-sink",
            enable_auto_commit=False,
            # an exactly-once worker's aborted rounds are never counted
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
        )
        await self._consumer.start()
        self._consumer.subscribe(list(self._tables), listener=_Rebalance(self))
        log.info(
            "sink started in %.2f s: %s, group %s, topics %s",
            time.perf_counter() - t0,
            "chDB " + str(cfg.chdb_path) if cfg.embedded else "ClickHouse server",
            cfg.sink_group_id,
            ", ".join(self._tables),
        )

    def stop(self) -> None:
        """Ask the sink to finish: stop reading, insert what was read, commit."""
        self._stopping.set()

    async def run(self) -> None:
        try:
            await self._loop()
        finally:
            await self._close()

    async def _close(self) -> None:
        for name, closer in (("consumer", self._consumer), ("admin", self._admin)):
            if closer is not None:
                try:
                    await closer.stop() if name == "consumer" else await closer.close()
                except Exception:
                    log.exception("error while closing the %s", name)
        if self._http is not None:
            await self._http.stop()
        self._query.close()
        await self._in_db(self.store.close)
        self._db.shutdown(wait=False)
        log.info("sink stopped")

    # -- the loop ------------------------------------------------------------
    def _buffered(self) -> int:
        return sum(len(b.rows) for b in self._bufs.values())

    def _due_in(self, now: float) -> float | None:
        starts = [b.since for b in self._bufs.values() if b.rows]
        return None if not starts else min(starts) + self.config.sink_batch_max_s - now

    async def _loop(self) -> None:
        assert self._consumer is not None
        cfg = self.config
        while not self._stopping.is_set():
            self._last_fetch = now = time.monotonic()
            due = self._due_in(now)
            timeout_ms = 500 if due is None else max(0, min(500, int(due * 1000)))
            room = max(1, cfg.sink_batch_max_rows - self._buffered())
            records = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=room)
            now = time.monotonic()
            for tp, recs in records.items():
                if tp in self._assigned:
                    self._intake(tp, recs, now)
            self.metrics.buffered.set(self._buffered())
            due = self._due_in(now)
            if self._buffered() >= cfg.sink_batch_max_rows or (due is not None and due <= 0):
                await self.flush()
            self._update_lag()
        # draining: what was read is inserted and committed
        await self.flush()
        log.info("drained: %d records left uninserted", self._buffered())

    def _intake(self, tp: TopicPartition, records: list[Any], now: float) -> None:
        buf = self._bufs.setdefault(tp, PartBuf())
        convert = self._tables[tp.topic][1]
        for rec in records:
            try:
                row: bytes | None = convert(rec.value)
            except BadRecord as exc:
                row = None
                self.metrics.errors.labels(error_label(exc)).inc()
                log.warning("skipping record %s:%d:%d: %s", tp.topic, tp.partition, rec.offset, exc)
            buf.add(rec.offset, row, now)

    def _update_lag(self) -> None:
        if self._consumer is None:
            return
        lag = 0
        for tp in self._assigned:
            hw = self._consumer.highwater(tp)
            if hw is not None and tp in self._committed:
                lag += max(0, hw - self._committed[tp])
        self.metrics.lag.set(lag)

    # -- flush: plan the cut, insert, commit ---------------------------------
    def _plan(self) -> dict[TopicPartition, int]:
        """Topic-partition -> last offset of the block this flush inserts."""
        plan: dict[TopicPartition, int] = {}
        for tp, buf in self._bufs.items():
            if not buf.rows or tp not in self._assigned:
                continue
            if buf.cut is not None:
                if buf.last_offset >= buf.cut:
                    plan[tp] = buf.cut  # the block a previous owner may have stored
                elif self._log_ends_before(tp, buf.cut):
                    log.warning("%s:%d: planned cut %d is past the log's end; dropped", tp.topic, tp.partition, buf.cut)
                    buf.cut = None
                    plan[tp] = buf.last_offset
                # else: wait until the records up to the cut are read
            else:
                plan[tp] = buf.last_offset
        return plan

    def _log_ends_before(self, tp: TopicPartition, cut: int) -> bool:
        hw = self._consumer.highwater(tp) if self._consumer else None
        return hw is not None and hw <= cut

    async def flush(self) -> None:
        """Insert every buffered partition as one block each, then commit.
        Retries the store with backoff until it succeeds or the sink stops
        (then the batch is left uncommitted, and replayed by the next run)."""
        async with self._flush_lock:
            plan = self._plan()
            if not plan:
                return
            assert self._consumer is not None
            # 1. write the cut down before inserting (see the module docstring)
            starts = {p: self._bufs[p].first_offset for p in plan}
            if not await self._commit({p: (starts[p], f"{CUT_PREFIX}{end}") for p, end in plan.items()}):
                return
            # 2. insert, one block per partition
            blocks = {
                p: self._bufs[p].rows[: sum(1 for o, _ in self._bufs[p].rows if o <= end)] for p, end in plan.items()
            }
            if not await self._insert_with_retry(plan, starts, blocks):
                return
            # 3. commit what was stored
            for p, end in plan.items():
                self._bufs[p].take(end)
                self._bufs[p].cut = None
            await self._commit({p: (end + 1, "") for p, end in plan.items()})
            self.metrics.buffered.set(self._buffered())

    async def _insert_with_retry(
        self,
        plan: dict[TopicPartition, int],
        starts: dict[TopicPartition, int],
        blocks: dict[TopicPartition, list[tuple[int, bytes | None]]],
    ) -> bool:
        delay = 0.1
        done: set[TopicPartition] = set()
        drain_deadline: float | None = None
        while True:
            t0 = time.perf_counter()
            try:
                for p, end in plan.items():
                    if p in done:
                        continue
                    rows = [r for _, r in blocks[p] if r is not None]
                    token = f"{p.topic}:{p.partition}:{starts[p]}-{end}"
                    await self._in_db(self.store.insert, rows, token, self._tables[p.topic][0])
                    done.add(p)
                    self.metrics.inserts.inc()
                    self.metrics.rows.inc(len(rows))
                self.metrics.insert_seconds.observe(time.perf_counter() - t0)
                return True
            except SinkError as exc:
                self.metrics.errors.labels("insert").inc()
                if self._stopping.is_set():
                    # a drain does not wait forever for a store that is gone
                    drain_deadline = drain_deadline or time.monotonic() + min(30.0, 2 * self.config.sink_retry_max_s)
                    if time.monotonic() > drain_deadline:
                        log.error(
                            "giving up on the insert while stopping: %s; %d partitions left "
                            "uncommitted (replayed by the next run)",
                            exc,
                            len(plan) - len(done),
                        )
                        return False
                log.warning("insert failed (retry in %.1f s): %s", delay, exc)
                await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
                delay = min(self.config.sink_retry_max_s, delay * 2)

    async def _commit(self, offsets: dict[TopicPartition, tuple[int, str]]) -> bool:
        assert self._consumer is not None
        owned = {p: v for p, v in offsets.items() if p in self._assigned}
        if not owned:
            return False
        try:
            await self._consumer.commit(owned)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # the partition moved: its next owner reads the cut and replays
            self.metrics.errors.labels("commit").inc()
            log.warning("commit of %s failed: %s", owned, exc)
            return False
        for p, (off, meta) in owned.items():
            if not meta:
                self._committed[p] = off
        return True

    # -- HTTP: /metrics /healthz /readyz POST /query --------------------------
    def _readiness(self) -> tuple[bool, str]:
        if not self._store_ready:
            return False, "store not started"
        if self._stopping.is_set():
            return False, "stopping"
        if not self._assigned:
            return False, "no partitions assigned"
        return True, f"ready: {len(self._assigned)} partitions"

    async def _start_http(self) -> None:
        cfg = self.config
        # a flush retrying a store that is down is alive; only a silent loop is not
        self._http = HealthServer(
            self.metrics.registry,
            cfg.sink_host,
            cfg.sink_port,
            ready=self._readiness,
            heartbeat_age_s=lambda: time.monotonic() - self._last_fetch,
            stale_after_s=30 + 2 * cfg.sink_retry_max_s,
            routes=[("POST", "/query", self._query.handle)],
            banner="sink HTTP on http://{host}:{port} (/metrics, /readyz, POST /query)",
        )
        await self._http.start()
        self.port = self._http.port

    # -- rebalance -----------------------------------------------------------
    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        parts = {tp for tp in revoked if tp.topic in self._tables}
        try:  # a flush in progress finishes (and commits) while we still own them
            await asyncio.wait_for(self._flush_lock.acquire(), timeout=30)
            self._flush_lock.release()
        except TimeoutError:
            log.warning("revoke: a flush is still running after 30 s")
        self._assigned -= parts
        for p in parts:
            self._bufs.pop(p, None)  # uncommitted: the next owner replays them
        self.metrics.assigned.set(len(self._assigned))
        log.info("revoked partitions %s", _names(parts))

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self._consumer is not None
        tps = [tp for tp in assigned if tp.topic in self._tables]
        cuts: dict[TopicPartition, int] = {}
        if tps and self._admin is not None:
            try:
                offsets = await self._admin.list_consumer_group_offsets(self.config.sink_group_id, partitions=tps)
            except KafkaError as exc:
                log.error("cannot read committed offsets of %s: %s", self.config.sink_group_id, exc)
                raise
            for tp, om in offsets.items():
                if om is None or om.offset < 0:
                    continue
                self._committed[tp] = om.offset
                meta = om.metadata or ""
                if meta.startswith(CUT_PREFIX):
                    cuts[tp] = int(meta[len(CUT_PREFIX) :])
        self._assigned = {tp for tp in self._consumer.assignment() if tp.topic in self._tables}
        for tp in tps:
            self._bufs[tp] = PartBuf(cut=cuts.get(tp))
        if cuts:
            log.info(
                "replaying planned blocks (partition -> last offset): %s",
                {f"{tp.topic}:{tp.partition}": end for tp, end in cuts.items()},
            )
        self.metrics.assigned.set(len(self._assigned))
        log.info("assigned partitions %s", _names(self._assigned))


def _names(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(tps)) or "none"


async def serve(config: SinkConfig, on_ready: Callable[[TelemetrySink], None] | None = None) -> None:
    """Run the sink until SIGTERM or SIGINT, then drain (insert what was read,
    commit) and return."""
    sink = TelemetrySink(config)
    loop = asyncio.get_running_loop()
    await sink.start()
    running = asyncio.create_task(sink.run(), name="sink")

    def on_signal() -> None:
        if sink._stopping.is_set():  # a second signal: stop now, uncommitted is replayed
            running.cancel()
        sink.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if on_ready is not None:
        on_ready(sink)
    await running
