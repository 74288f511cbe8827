"""The Python client: produce requests, await or stream their results.

One producer and one results reader per client. The reader is assigned
every partition of its results topic (no consumer group), positioned at the
end before the first request goes out, so no answer can be missed. By default
that is the shared results topic, where the client keeps the answers it waits
for; with `reply_topic` it is a topic of the client's own, which carries only
its answers (`producers.replies`).

A wait that times out is forgotten; a reader that fails fails every waiting
call at once and is started again, positioned at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from producers.replies import Waiting, delete_reply_topic, ensure_reply_topic
from schemas.errors import SluiceError
from schemas.keys import partition_key
from schemas.records import Result, now_ms
from schemas.service.tasks import supervise
from schemas.topics import KafkaConfig

log = logging.getLogger(__name__)


class ClientError(SluiceError):
    code = "client"


class ResultTimeout(ClientError):
    code = "timeout"
    retriable = True


def make_request(
    text: str,
    *,
    id: str | None = None,
    task: str = "embed",
    model: str | None = None,
    tenant: str = "default",
    labels: Iterable[str] | None = None,
    reply_to: str | None = None,
    deadline_ms: int | None = None,
    cache: str = "use",
) -> dict[str, Any]:
    """A request record with the contract's field names (no validation here:
    the worker validates, and answers a bad request with an error result)."""
    doc: dict[str, Any] = {
        "v": 1,
        "id": id or uuid.uuid4().hex,
        "input": text,
        "task": task,
        "tenant": tenant,
        "cache": cache,
    }
    for name, value in (("model", model), ("reply_to", reply_to), ("deadline_ms", deadline_ms)):
        if value is not None:
            doc[name] = value
    if labels is not None:
        doc["labels"] = list(labels)
    return doc


def destination(config: KafkaConfig, doc: dict[str, Any]) -> tuple[str, bytes]:
    """(topic, key) of a request: PREFIX.ingress keyed by tenant when an
    admission stage lets requests through (every request of a tenant meets
    one stage, which holds its counters), else PREFIX.requests keyed by cache key."""
    if config.tenant_topics:  # the broker holds the tenant to its topic
        doc["tenant"] = config.tenant
        return config.topics.tenant_requests(config.tenant), request_key(doc)
    if config.admission:
        return config.topics.ingress, str(doc.get("tenant", "default")).encode()
    return config.topics.requests, request_key(doc)


def results_topic_of(config: KafkaConfig) -> str:
    """Where a client's results come by default: its tenant's topic under tenant topics."""
    return config.topics.tenant_results(config.tenant) if config.tenant_topics else config.topics.results


def requests_topic_of(config: KafkaConfig) -> str:
    """The topic a client's requests go to first."""
    if config.tenant_topics:
        return config.topics.tenant_requests(config.tenant)
    return config.topics.ingress if config.admission else config.topics.requests


def request_key(doc: dict[str, Any]) -> bytes:
    """The partition key: identical requests meet on one partition."""
    labels = doc.get("labels")
    text = doc.get("input")
    if not isinstance(text, str):
        return str(doc.get("id", "")).encode()
    return partition_key(
        tenant=str(doc.get("tenant", "default")),
        model=doc.get("model"),
        task=str(doc.get("task", "embed")),
        labels=tuple(labels) if isinstance(labels, list) else None,
        text=text,
    )


class SluiceClient:
    """Async client. `async with SluiceClient(KafkaConfig(...)) as c: await c.submit("text")`."""

    def __init__(
        self,
        config: KafkaConfig | None = None,
        *,
        results_topic: str | None = None,
        reply_topic: str | None = None,
        timeout_s: float = 60.0,
        linger_ms: int = 2,
        fetch_max_wait_ms: int = 5,
        fetch_min_bytes: int = 65536,
    ) -> None:
        self.config = config or KafkaConfig()
        self.topics = self.config.topics
        if reply_topic and results_topic:
            raise ValueError("results_topic and reply_topic: name one")
        # a reply topic of the client's own is made at start and removed at stop
        self.reply_topic = reply_topic
        self._made_reply_topic = False
        self.results_topic = reply_topic or results_topic or results_topic_of(self.config)
        self.timeout_s = timeout_s
        self._linger_ms = linger_ms
        # The broker holds a results fetch until fetch_min_bytes gather or
        # fetch_max_wait_ms pass: a result may wait that long more, and the
        # broker answers one fetch per few ms instead of one per result or
        # two (with the worker's fetches batched too, a quarter less CPU
        # per request at 1,000/s: bench/RESULTS.md).
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._fetch_min_bytes = fetch_min_bytes
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task | None = None
        self._waiting = Waiting()
        self._restarts = 0
        # set while a reader is positioned: a request sent while it restarts
        # waits for it, or its answer could pass before the new reader's position
        self._reading = asyncio.Event()
        self._streams: list[asyncio.Queue[dict[str, Any] | ClientError]] = []
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"

    async def __aenter__(self) -> SluiceClient:
        try:
            await self.start()
        except BaseException:
            await self.stop()  # what did start is closed, not left to warn at exit
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def pending(self) -> int:
        """Requests sent and still waited for."""
        return len(self._waiting)

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if self.reply_topic:
            self._made_reply_topic = await loop.run_in_executor(None, ensure_reply_topic, cfg, self.reply_topic)
        self._producer = AIOKafkaProducer(
            **cfg.aiokafka(), acks="all", enable_idempotence=True, linger_ms=self._linger_ms
        )
        await self._producer.start()
        # metadata now, not at the first send
        await self._producer.partitions_for(requests_topic_of(cfg))
        await self._start_reader()

    async def _start_reader(self) -> None:
        """A results reader at the topic's end: everything sent from now on is answered to it."""
        cfg = self.config
        self._consumer = AIOKafkaConsumer(
            **cfg.aiokafka(),
            enable_auto_commit=False,
            group_id=None,
            isolation_level="read_committed",
            fetch_max_wait_ms=self._fetch_max_wait_ms,
            fetch_min_bytes=self._fetch_min_bytes,
        )
        await self._consumer.start()
        parts = await self._wait_partitions(self.results_topic)
        tps = [TopicPartition(self.results_topic, p) for p in parts]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # materialise the positions now, before any request is sent
            await self._consumer.position(tp)
        self._reading.set()
        self._reader = supervise(self._read_results(), name="sluice-client-results", on_failure=self._reader_failed)

    async def _wait_partitions(self, topic: str, timeout_s: float = 30.0) -> set[int]:
        assert self._consumer is not None
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            parts = self._consumer.partitions_for_topic(topic)
            if parts:
                return parts
            if asyncio.get_running_loop().time() > deadline:
                user = self.config.kafka_sasl_username
                # a broker lists no topic its principal may not describe
                hint = f"or the ACLs do not let {user} read it" if user else "is the stack up? `sluice up`"
                raise ClientError(f"results topic {topic!r} not found on {self.config.bootstrap_servers} ({hint})")
            await self._consumer._client.force_metadata_update()  # aiokafka has no public refresh
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self._reader = None
        self._waiting.fail_all(ClientError("client stopped before the result arrived"))
        for part in (self._producer, self._consumer):
            if part is not None:
                await part.stop()
        self._producer = self._consumer = None
        if self._made_reply_topic and self.reply_topic:
            await asyncio.get_running_loop().run_in_executor(None, delete_reply_topic, self.config, self.reply_topic)
            self._made_reply_topic = False

    def _reader_failed(self, exc: BaseException) -> None:
        """The results that were on their way are lost with the reader's
        position: every waiting call fails now instead of at its timeout,
        and a new reader starts at the end for the calls that follow."""
        failure = ClientError(f"the results reader stopped: {exc!r}")
        self._reading.clear()
        self._waiting.fail_all(failure)
        for q in self._streams:
            q.put_nowait(failure)
        self._reader = supervise(self._restart_reader(), name="sluice-client-reconnect", on_failure=self._reader_failed)

    async def _restart_reader(self) -> None:
        self._restarts += 1
        await asyncio.sleep(min(5.0, 0.2 * 2 ** min(self._restarts, 5)))  # a failing broker is not hammered
        old, self._consumer = self._consumer, None
        if old is not None:
            try:
                await old.stop()
            except Exception as exc:
                log.warning("closing the failed results reader: %r", exc)
        await self._start_reader()
        log.warning("results reader started again (restart %d)", self._restarts)

    async def _read_results(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batches.values():
                for rec in records:
                    try:
                        doc = orjson.loads(rec.value)
                    except (orjson.JSONDecodeError, TypeError):
                        log.warning("unreadable result at %s:%s", rec.partition, rec.offset)
                        continue
                    if not isinstance(doc, dict):
                        continue
                    doc["_received_at_ms"] = now_ms()
                    self._waiting.resolve(doc)
                    for q in self._streams:
                        q.put_nowait(doc)

    # -- sending -------------------------------------------------------------
    async def send(self, doc: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Produce one request record; return a future of its result. The
        record is keyed so that identical requests share a partition."""
        assert self._producer is not None, "call start() first"
        if not self._reading.is_set():
            try:
                await asyncio.wait_for(self._reading.wait(), self.timeout_s)
            except TimeoutError:
                raise ClientError(f"no results reader on {self.results_topic!r} for {self.timeout_s} s") from None
        doc.setdefault("sent_at_ms", now_ms())
        if self.results_topic != self.topics.results:
            doc.setdefault("reply_to", self.results_topic)
        fut = self._waiting.add(doc["id"])
        topic, key = destination(self.config, doc)
        try:
            await self._producer.send(topic, orjson.dumps(doc), key=key)
        except BaseException:
            self._waiting.forget(doc["id"])
            raise
        return fut

    async def send_raw(self, value: bytes, key: bytes | None = None) -> None:
        """Produce bytes as they are (tests of bad input, kcat-style use)."""
        assert self._producer is not None, "call start() first"
        await (await self._producer.send(requests_topic_of(self.config), value, key=key))

    def expect(self, request_id: str) -> asyncio.Future[dict[str, Any]]:
        """A future for a result of a request sent some other way."""
        return self._waiting.get_or_add(request_id)

    async def flush(self) -> None:
        assert self._producer is not None
        await self._producer.flush()

    async def submit(self, text: str, *, timeout_s: float | None = None, **fields: Any) -> Result:
        """Send one request and await its result."""
        fut = await self.send(make_request(text, **fields))
        return Result.model_validate(await self._await(fut, timeout_s))

    async def submit_many(self, texts: Iterable[str], *, timeout_s: float | None = None, **fields: Any) -> list[Result]:
        """Send many requests at once; results in the order of `texts`."""
        futs = [await self.send(make_request(t, **fields)) for t in texts]
        await self.flush()
        docs = await asyncio.gather(*(self._await(f, timeout_s) for f in futs))
        return [Result.model_validate(d) for d in docs]

    async def stream(
        self, requests: Iterable[dict[str, Any] | str], *, timeout_s: float | None = None
    ) -> AsyncIterator[Result]:
        """Send requests and yield each result as it arrives (arrival order)."""
        pending: set[asyncio.Future[dict[str, Any]]] = set()
        for r in requests:
            pending.add(await self.send(make_request(r) if isinstance(r, str) else dict(r)))
        await self.flush()
        limit = timeout_s or self.timeout_s
        while pending:
            done, pending = await asyncio.wait(pending, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                for fut in pending:
                    fut.cancel()  # forgotten: their results will not be waited for
                raise ResultTimeout(f"{len(pending)} results did not arrive within {limit} s")
            for fut in done:
                yield Result.model_validate(fut.result())

    async def results(self) -> AsyncIterator[dict[str, Any]]:
        """Every result on the results topic from now on (for `subscribe`)."""
        q: asyncio.Queue[dict[str, Any] | ClientError] = asyncio.Queue()
        self._streams.append(q)
        try:
            while True:
                got = await q.get()
                if isinstance(got, ClientError):
                    raise got
                yield got
        finally:
            self._streams.remove(q)

    async def _await(self, fut: asyncio.Future[dict[str, Any]], timeout_s: float | None) -> dict[str, Any]:
        limit = timeout_s or self.timeout_s
        try:
            # not shielded: a wait that ends cancels the future, and the
            # cancelled future is forgotten (Waiting)
            return await asyncio.wait_for(fut, timeout=limit)
        except TimeoutError:
            raise ResultTimeout(f"no result within {limit} s") from None
