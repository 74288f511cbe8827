"""`sluice admission`: PREFIX.ingress (keyed by tenant) -> limits -> PREFIX.requests (keyed by cache key).

Each round:
  1. fetch up to `admission_batch_max_records` ingress records;
  2. decide each, in order, per tenant: the kill switch, overload (the
     workers' lag), the tenant's rates, then its budgets (a reservation of
     its charge: tokens counted with the model's tokenizer times the
     model's price per token);
  3. publish: admitted requests, unchanged, to PREFIX.requests keyed by
     their cache key (so cache affinity holds); a `rejected` result to the
     request's reply_to (or PREFIX.results) and its telemetry record; the
     state of every tenant touched to PREFIX.admission-state;
  4. wait for every acknowledgement, then commit the ingress offsets.

State: ingress partition p's tenants have their counters in partition p
of the compacted PREFIX.admission-state. A stage that is assigned p reads
them back (a restart, or another stage's partitions after a rebalance)
before it decides anything there; a stage losing p finishes its round
first. A crash between 3 and 4 replays the round: the requests are
admitted again (a request id reserved already is not reserved twice) and
the rates count them twice, which errs towards refusing, never towards
overspending.

Settlement: the stage follows PREFIX.telemetry; a record of a reserved
request replaces the reservation with what it was charged: the tokens the
worker computed at the model's price (a cache hit computed none, so its
reservation comes back).

Records that are not valid requests (or name an unknown model) go through
untouched: the workers answer them with the error, as without admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from processors.admission.config import AdmissionConfig
from processors.admission.control import ControlView, stop_following
from processors.admission.limits import (
    KILL_SWITCH,
    NO_GLOBAL_LIMITS,
    OVERLOADED,
    TenantState,
    Verdict,
    admit,
    day_of,
    month_of,
)
from processors.runtime import discover_models, model_tokenizer
from schemas.errors import RequestError
from schemas.keys import partition_key
from schemas.records import Request, encode, now_ms, parse_request, result_doc, telemetry_doc
from schemas.service.http import HealthServer
from schemas.service.lag import BrokerSignals, Overload, partitions_of
from schemas.service.tasks import supervise
from schemas.topics import KafkaConfig

log = logging.getLogger(__name__)

_ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sluice_admission_requests_total",
            "Ingress records decided: admitted, passed (not a valid request: the workers answer it), "
            "rate_limited, budget_exhausted, overloaded, kill_switch.",
            ["outcome"],
            registry=r,
        )
        self.round_seconds = Histogram(
            "sluice_admission_round_seconds", "One round: decide, publish, commit.", buckets=_ROUND_BUCKETS, registry=r
        )
        self.reserved = Gauge("sluice_admission_reserved_usd", "Budget held by unsettled reservations.", registry=r)
        self.settled = Counter("sluice_admission_settled_total", "Reservations settled by telemetry.", registry=r)
        self.expired = Counter("sluice_admission_expired_total", "Reservations released unsettled.", registry=r)
        self.lag = Gauge("sluice_admission_workers_lag_records", "The workers' lag on PREFIX.requests.", registry=r)
        self.overloaded = Gauge("sluice_admission_overloaded", "1 while overload rejects new requests.", registry=r)
        self.kill_switch = Gauge("sluice_admission_kill_switch", "1 while the kill switch is on.", registry=r)
        self.tenants = Gauge("sluice_admission_tenants", "Tenants whose counters this stage holds.", registry=r)
        self.assigned = Gauge("sluice_admission_assigned_partitions", "Ingress partitions this stage owns.", registry=r)
        self.usd_per_token = Gauge(
            "sluice_admission_usd_per_token", "What budgets charge per token computed, by model.", ["model"], registry=r
        )


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, stage: AdmissionStage) -> None:
        self._stage = stage

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._stage._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._stage._on_assigned(assigned)


class AdmissionStage:
    def __init__(self, config: AdmissionConfig, metrics: AdmissionMetrics | None = None) -> None:
        self.config = config
        self.topics = config.topics
        self.metrics = metrics or AdmissionMetrics()
        self.name = f"admission:{config.worker_id}"
        self._usd_per_token: dict[str, float] = {}  # model ref -> what a computed token is charged
        self.control = ControlView(config, self.topics.control, on_change=self._on_control)
        self.states = StateView(config, self.topics.admission_state)
        self.lag = BrokerSignals(config, self.topics.requests, config.group_id)
        self.overload = Overload(
            self.lag,
            limit=config.admission_overload_lag,
            resume=config.admission_overload_resume_lag,
            interval_s=config.admission_lag_interval_s,
        )
        self._tenants: dict[int, dict[str, TenantState]] = {}  # owned ingress partition -> tenant -> counters
        self._dirty: set[tuple[int, str]] = set()
        self._tokenizers: dict[str, tuple[Any, str]] = {}  # model name -> (tokenizer, ref)
        self._consumer: AIOKafkaConsumer | None = None
        self._telemetry: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._http: HealthServer | None = None
        self._round = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_round = time.monotonic()
        self.port: int | None = None

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        for name, folder in discover_models(cfg.models_dir).items():
            card, tok = model_tokenizer(folder)
            self._tokenizers[name] = (tok, card.ref)
            per_million = cfg.admission_usd_per_million_tokens
            price = (card.price_per_million_tokens_usd if per_million is None else per_million) / 1e6
            self._usd_per_token[card.ref] = price
            self.metrics.usd_per_token.labels(card.ref).set(price)
        await self.control.start()
        await self.states.start()
        await self.lag.start()
        self._producer = AIOKafkaProducer(
            **cfg.aiokafka(),
            client_id="sluice-admission",
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
        )
        await self._producer.start()
        await self._start_telemetry()
        self._consumer = AIOKafkaConsumer(
            **cfg.aiokafka(),
            group_id=cfg.admission_group_id,
            client_id="sluice-admission",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=cfg.admission_batch_max_records,
        )
        await self._consumer.start()
        self._consumer.subscribe([self.topics.ingress], listener=_Rebalance(self))
        self._http = HealthServer(
            self.metrics.registry,
            cfg.admission_host,
            cfg.admission_port,
            ready=self._readiness,
            heartbeat_age_s=lambda: time.monotonic() - self._last_round,
            banner="admission HTTP on http://{host}:{port} (/metrics, /readyz)",
        )
        await self._http.start()
        self.port = self._http.port
        for coro, name in ((self._follow_telemetry(), "telemetry"), (self._watch_lag(), "workers' lag")):
            self._tasks.append(supervise(coro, name=name, on_failure=lambda exc: self.stop()))
        self.metrics.kill_switch.set(int(self.control.control.kill_switch.on))
        log.info(
            "admission started in %.2f s: %s -> %s, group %s, models %s",
            time.perf_counter() - t0,
            self.topics.ingress,
            self.topics.requests,
            cfg.admission_group_id,
            ", ".join(sorted(self._tokenizers)),
        )

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        assert self._consumer is not None
        try:
            while not self._stopping.is_set():
                self._last_round = time.monotonic()
                batches = await self._consumer.getmany(
                    timeout_ms=100, max_records=self.config.admission_batch_max_records
                )
                async with self._round:
                    if batches:
                        await self._round_of(batches)
                    await self._housekeeping()
        finally:
            await self._close()

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for closer in (self._consumer, self._telemetry):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.stop()
        await self.control.stop()
        await self.states.stop()
        await self.lag.close()
        if self._producer is not None:
            await self._producer.stop()
        if self._http is not None:
            await self._http.stop()
        log.info("admission stopped")

    def _readiness(self) -> tuple[bool, str]:
        if self._stopping.is_set():
            return False, "stopping"
        if not self._tenants and not (self._consumer and self._consumer.assignment()):
            return False, "no partitions assigned"
        return True, f"ready: {len(self._tenants)} partitions"

    # -- one round -------------------------------------------------------------
    async def _round_of(self, batches: dict[TopicPartition, list[Any]]) -> None:
        assert self._producer is not None and self._consumer is not None
        t0 = time.perf_counter()
        sends: list[asyncio.Future[Any]] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, records in batches.items():
            if tp.partition not in self._tenants:
                # fetched before its counters are read back (or after it was revoked):
                # fetch these again once it is ready, or leave them to the next owner
                if tp in self._consumer.assignment():
                    self._consumer.seek(tp, records[0].offset)
                continue
            parsed = [(rec, self._parse(rec)) for rec in records]
            tokens = self._count_tokens([req for _, req in parsed if req is not None])
            for rec, req in parsed:
                sends.extend(await self._decide(tp.partition, rec, req, tokens))
            offsets[tp] = records[-1].offset + 1
        sends.extend(await self._write_states())
        if sends:
            await asyncio.gather(*sends)
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError, KafkaError) as exc:
                log.warning("commit of %s failed (the round is replayed by the next owner): %s", offsets, exc)
        self.metrics.round_seconds.observe(time.perf_counter() - t0)

    def _parse(self, rec: Any) -> Request | None:
        """The request, or None when it is not one (the workers answer its error)."""
        try:
            return parse_request(rec.value, self.config)
        except RequestError:
            return None

    def _count_tokens(self, reqs: list[Request]) -> dict[int, int]:
        """Tokens of each request (input plus labels, by id() of the request),
        one tokenizer call per model for the whole batch of a partition."""
        by_model: dict[str, list[Request]] = defaultdict(list)
        for req in reqs:
            by_model[req.model or self.config.default_model].append(req)
        counts: dict[int, int] = {}
        for model, group in by_model.items():
            if model not in self._tokenizers:
                continue  # passed through untouched
            tok = self._tokenizers[model][0]
            texts = [t for req in group for t in (req.input, *(req.labels or ()))]
            lengths = iter(len(enc.ids) for enc in tok.encode_batch(texts, add_special_tokens=True))
            for req in group:
                counts[id(req)] = sum(next(lengths) for _ in range(1 + len(req.labels or ())))
        return counts

    async def _decide(
        self, partition: int, rec: Any, req: Request | None, tokens_of: dict[int, int]
    ) -> list[asyncio.Future[Any]]:
        assert self._producer is not None
        cfg = self.config
        if req is None:
            return [await self._pass(rec)]
        counted = self._tokenizers.get(req.model or cfg.default_model)
        if counted is None:
            return [await self._pass(rec)]
        ref = counted[1]
        at = now_ms()
        control = self.control.control
        if control.kill_switch.on:
            verdict = Verdict(
                False, KILL_SWITCH, f"inference is stopped: {control.kill_switch.reason or 'kill switch'}"
            )
        elif self.overloaded:
            verdict = Verdict(
                False,
                OVERLOADED,
                f"the workers have more than {cfg.admission_overload_lag} requests waiting",
                cfg.admission_overload_retry_after_ms,
            )
        else:
            tokens = tokens_of[id(req)]
            state = self._tenants[partition].setdefault(req.tenant, TenantState())
            verdict = admit(
                state,
                control.limits_of(req.tenant),
                request_id=req.id,
                tokens=tokens,
                estimate_usd=tokens * self._usd_per_token[ref],
                at_ms=at,
                reservation_ttl_ms=int(cfg.admission_reservation_ttl_s * 1000),
                global_limits=control.global_limits,
                # over every tenant: only worth adding up when there is a global budget
                global_spent=self._global_spent(at) if control.global_limits != NO_GLOBAL_LIMITS else None,
            )
            self._dirty.add((partition, req.tenant))
        self.metrics.requests.labels("admitted" if verdict.admitted else verdict.code).inc()
        if verdict.admitted:
            key = partition_key(tenant=req.tenant, model=req.model, task=req.task, labels=req.labels, text=req.input)
            return [await self._producer.send(self.topics.requests, rec.value, key=key)]
        return await self._reject(req, ref, verdict, partition, rec.offset, at)

    async def _pass(self, rec: Any) -> asyncio.Future[Any]:
        assert self._producer is not None
        self.metrics.requests.labels("passed").inc()
        return await self._producer.send(self.topics.requests, rec.value, key=rec.key)

    async def _reject(
        self, req: Request, ref: str, verdict: Verdict, partition: int, offset: int, at: int
    ) -> list[asyncio.Future[Any]]:
        assert self._producer is not None
        sent = req.sent_at_ms or at
        result = result_doc(
            id=req.id,
            status="rejected",
            task=req.task,
            model=ref,
            cache="none",
            sent_ms=sent,
            started_ms=at,
            cache_ms=0.0,
            inference_start_ms=at,
            inference_end_ms=at,
            done_ms=at,
            tokens=0,
            batch_size=0,
            cost_usd=0.0,
            worker=self.name,
            error_code=verdict.code,
            error_message=verdict.message,
            retry_after_ms=verdict.retry_after_ms,
        )
        name, _, version = ref.partition("@")
        telemetry = telemetry_doc(
            id=req.id,
            tenant=req.tenant,
            model=name,
            model_version=version,
            task=req.task,
            status="rejected",
            error_code=verdict.code,
            cache="none",
            tokens=0,
            batch_size=0,
            worker=self.name,
            partition=partition,
            offset=offset,
            sent_at_ms=sent,
            received_at_ms=at,
            started_ms=at,
            inference_start_ms=at,
            inference_end_ms=at,
            published_at_ms=now_ms(),
            cache_ms=0.0,
            compute_ms=0.0,
            cost_usd=0.0,
        )
        key = req.id.encode()
        return [
            await self._producer.send(req.reply_to or self.topics.results, encode(result), key=key),
            await self._producer.send(self.topics.telemetry, encode(telemetry), key=key),
        ]

    def _global_spent(self, at_ms: int) -> tuple[float, float]:
        """Today's and this month's spend (reservations included) over all tenants:
        those held here live, the others as their owners last wrote them."""
        day, month = day_of(at_ms), month_of(at_ms)
        today = this_month = 0.0
        for tenants in self._tenants.values():
            for st in tenants.values():
                held = st.reserved_usd
                today += (st.spent_day_usd if st.day == day else 0.0) + held
                this_month += (st.spent_month_usd if st.month == month else 0.0) + held
        for (partition, _), doc in self.states.latest.items():
            if partition in self._tenants:
                continue
            held = sum(v[0] for v in doc.get("reserved", {}).values())
            today += (doc.get("spent_day_usd", 0.0) if doc.get("day") == day else 0.0) + held
            this_month += (doc.get("spent_month_usd", 0.0) if doc.get("month") == month else 0.0) + held
        return today, this_month

    async def _write_states(self) -> list[asyncio.Future[Any]]:
        assert self._producer is not None
        sends = []
        for partition, tenant in sorted(self._dirty):
            st = self._tenants.get(partition, {}).get(tenant)
            if st is None:
                continue
            sends.append(
                await self._producer.send(
                    self.topics.admission_state, orjson.dumps(st.to_doc()), key=tenant.encode(), partition=partition
                )
            )
        self._dirty.clear()
        return sends

    async def _housekeeping(self) -> None:
        """Release expired reservations, write what settling changed, refresh the gauges."""
        at = now_ms()
        reserved = 0.0
        for partition, tenants in self._tenants.items():
            for tenant, st in tenants.items():
                gone = st.expire(at)
                if gone:
                    self.metrics.expired.inc(len(gone))
                    self._dirty.add((partition, tenant))
                reserved += st.reserved_usd
        self.metrics.reserved.set(reserved)
        self.metrics.tenants.set(sum(len(t) for t in self._tenants.values()))
        if self._dirty:
            sends = await self._write_states()
            if sends:
                await asyncio.gather(*sends)

    # -- settlement ------------------------------------------------------------
    async def _start_telemetry(self) -> None:
        """Follow telemetry from the oldest reservation that may still wait for it."""
        consumer = self._telemetry = AIOKafkaConsumer(
            **self.config.aiokafka(),
            group_id=None,
            enable_auto_commit=False,
            client_id="sluice-admission-telemetry",
            isolation_level="read_committed",
        )
        await consumer.start()
        tps = await partitions_of(consumer, self.topics.telemetry)
        consumer.assign(tps)
        since = now_ms() - int(self.config.admission_reservation_ttl_s * 1000)
        found = await consumer.offsets_for_times(dict.fromkeys(tps, since))
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            at = found.get(tp)
            consumer.seek(tp, at.offset if at is not None else ends[tp])

    async def _follow_telemetry(self) -> None:
        assert self._telemetry is not None
        while True:
            batches = await self._telemetry.getmany(timeout_ms=200, max_records=2000)
            if not batches:
                continue
            async with self._round:
                for records in batches.values():
                    for rec in records:
                        self._settle(rec.value)

    def _settle(self, raw: bytes | None) -> None:
        """A telemetry record settles its request's reservation at what it was
        charged: the tokens the worker computed (none for a cache hit) at the
        model's price."""
        try:
            doc = orjson.loads(raw) if raw else None
            if not isinstance(doc, dict) or doc.get("status") == "rejected":
                return
            price = self._usd_per_token.get(f"{doc.get('model')}@{doc.get('model_version')}", 0.0)
            charge = int(doc.get("tokens", 0)) * price if doc.get("cache") == "miss" else 0.0
            tenant, rid = str(doc.get("tenant")), str(doc.get("id"))
            at = int(doc.get("published_at_ms") or now_ms())
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return
        for partition, tenants in self._tenants.items():
            st = tenants.get(tenant)
            if st is not None and st.settle(rid, charge, at):
                self.metrics.settled.inc()
                self._dirty.add((partition, tenant))
                return

    # -- overload and control ----------------------------------------------------
    @property
    def overloaded(self) -> bool:
        return self.overload.overloaded

    async def _watch_lag(self) -> None:
        def gauges() -> None:
            self.metrics.lag.set(self.overload.lag or 0)
            self.metrics.overloaded.set(int(self.overload.overloaded))

        await self.overload.watch(on_reading=gauges)

    def _on_control(self, control: Any, key: str) -> None:
        if key == "kill_switch":
            ks = control.kill_switch
            self.metrics.kill_switch.set(int(ks.on))
            log.warning("kill switch %s%s", "ON" if ks.on else "off", f": {ks.reason}" if ks.reason else "")
        else:
            log.info("control: %s changed", key)

    # -- rebalance ---------------------------------------------------------------
    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        # the round in progress publishes and commits first (bounded: its commit
        # may itself wait for this rebalance, and then fails and is replayed)
        try:
            await asyncio.wait_for(self._round.acquire(), timeout=10)
        except TimeoutError:
            log.warning("revoke: a round is still running after 10 s")
        else:
            try:  # what settling changed since the round goes out with them
                sends = await self._write_states()
                if sends:
                    await asyncio.gather(*sends)
            finally:
                self._round.release()
        for tp in revoked:
            self._tenants.pop(tp.partition, None)
        self.metrics.assigned.set(len(self._tenants))
        log.info("revoked ingress partitions %s", sorted(tp.partition for tp in revoked))

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        parts = sorted(tp.partition for tp in assigned if tp.topic == self.topics.ingress)
        await self.states.caught_up_to_now(parts)
        for p in parts:
            self._tenants[p] = {
                tenant: TenantState.from_doc(doc) for (q, tenant), doc in self.states.latest.items() if q == p
            }
        self.metrics.assigned.set(len(self._tenants))
        log.info(
            "assigned ingress partitions %s (%d tenants' counters read back)",
            parts,
            sum(len(self._tenants[p]) for p in parts),
        )


class StateView:
    """Follows PREFIX.admission-state whole: the latest counters of every tenant,
    by (partition, tenant); read back on assignment, summed for the global budget."""

    def __init__(self, kafka: str | KafkaConfig, topic: str) -> None:
        self.kafka = KafkaConfig.of(kafka)
        self.topic = topic
        self.latest: dict[tuple[int, str], dict[str, Any]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._tps: list[TopicPartition] = []

    async def start(self) -> None:
        c = self._consumer = AIOKafkaConsumer(
            **self.kafka.aiokafka(), group_id=None, enable_auto_commit=False, client_id="sluice-state"
        )
        await c.start()
        self._tps = await partitions_of(c, self.topic)
        c.assign(self._tps)
        await c.seek_to_beginning(*self._tps)
        self._task = supervise(self._follow(), name="admission state view")

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            for tp, recs in batches.items():
                for rec in recs:
                    if rec.key is None:
                        continue
                    key = (tp.partition, rec.key.decode())
                    if rec.value is None:
                        self.latest.pop(key, None)
                    else:
                        with contextlib.suppress(orjson.JSONDecodeError):
                            self.latest[key] = orjson.loads(rec.value)

    async def caught_up_to_now(self, partitions: list[int], timeout_s: float = 60.0) -> None:
        """Wait until the view holds everything written to these partitions so far."""
        assert self._consumer is not None
        tps = [tp for tp in self._tps if tp.partition in partitions]
        if not tps:
            return
        ends = await self._consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while not await self._reached(ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"admission state of partitions {partitions} not read back in {timeout_s:g} s")
            await asyncio.sleep(0.05)

    async def _reached(self, ends: dict[TopicPartition, int]) -> bool:
        assert self._consumer is not None
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return False
        return True

    async def stop(self) -> None:
        await stop_following(self._task, self._consumer)


async def serve(config: AdmissionConfig, on_ready: Callable[[AdmissionStage], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT; the round in progress publishes and commits first."""
    stage = AdmissionStage(config)
    await stage.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stage.stop)
    if on_ready is not None:
        on_ready(stage)
    await stage.run()
