"""The load generator's transport over librdkafka (confluent-kafka).

Same protocol as `SluiceClient` (send a request, get a future of its
result), built for one job: offering load without taking the CPU of the
system it measures. On a small machine that runs the broker and a worker
beside the generator, aiokafka's pure-Python protocol code made the
generator itself the largest user of the cores (0.65-0.7 ms of CPU per
request at 1,000/s, more than the broker). librdkafka does that work in C,
in its own threads.

Records are keyed and partitioned exactly as `SluiceClient` does (murmur2,
Kafka's Java default), so a request lands on the same partition, and so the
same worker and cache, whichever client sent it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import orjson

from producers.client import ClientError, destination, requests_topic_of, results_topic_of
from schemas.records import now_ms
from schemas.topics import KafkaConfig

_HAND_OVER = 32  # answers parsed and handed to the event loop at a time


def _confluent():
    try:
        import confluent_kafka
    except ImportError as exc:  # an optional extra: say which
        raise ClientError(
            "the librdkafka transport needs confluent-kafka: pip install 'sluice[bench]' (or confluent-kafka)"
        ) from exc
    return confluent_kafka


class RdKafkaClient:
    """`async with RdKafkaClient(KafkaConfig(...)) as c: fut = await c.send(doc)`."""

    def __init__(
        self,
        config: KafkaConfig | None = None,
        *,
        linger_ms: float = 0.0,
        poll_timeout_s: float = 0.05,
        fetch_max_wait_ms: int = 5,
        fetch_min_bytes: int = 65536,
    ) -> None:
        self.config = config or KafkaConfig()
        self.topics = self.config.topics
        self.results_topic = results_topic_of(self.config)
        self._linger_ms = linger_ms
        # results are fetched at most every fetch_max_wait_ms (unless
        # fetch_min_bytes gather sooner): a few ms more per result, far
        # fewer fetches for the broker to answer (see SluiceClient)
        self._fetch = {"fetch.wait.max.ms": fetch_max_wait_ms, "fetch.min.bytes": fetch_min_bytes}
        self._poll_timeout_s = poll_timeout_s
        self._producer: Any = None
        self._consumer: Any = None
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    async def __aenter__(self) -> RdKafkaClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        ck = _confluent()
        self._loop = asyncio.get_running_loop()
        servers = self.config.rdkafka()
        self._producer = ck.Producer(
            {
                **servers,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": self._linger_ms,
                "partitioner": "murmur2_random",
                "delivery.report.only.error": True,
                "socket.nagle.disable": True,
                "error_cb": self._on_error,
            }
        )
        self._consumer = ck.Consumer(
            {
                **servers,
                "group.id": f"sluice-loadgen-{now_ms()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": False,
                "socket.nagle.disable": True,
                **self._fetch,
            }
        )
        # metadata for the requests topic now, not at the first send
        await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: self._producer.list_topics(requests_topic_of(self.config), timeout=10),
        )
        self._reader = threading.Thread(target=self._read_results, name="sluice-rdkafka-results", daemon=True)
        self._reader.start()
        ready = await asyncio.get_running_loop().run_in_executor(None, self._ready.wait, 30.0)
        if self._error is not None:
            raise ClientError(f"results topic {self.results_topic!r}: {self._error}")
        if not ready:
            raise ClientError(
                f"results topic {self.results_topic!r} not readable on {servers} "
                "within 30 s (is the stack up? `sluice up`)"
            )

    def _on_error(self, err: Any) -> None:
        if err.fatal():
            self._error = ClientError(str(err))

    def _end_offset(self, ck: Any, partition: int, attempts: int = 20) -> int:
        """A partition's end offset; a topic made a moment ago may have no
        leader for it yet (NOT_LEADER_FOR_PARTITION), which passes."""
        for attempt in range(attempts):
            try:
                _, high = self._consumer.get_watermark_offsets(
                    ck.TopicPartition(self.results_topic, partition), timeout=10
                )
                return int(high)
            except ck.KafkaException as exc:
                err = exc.args[0]
                passing = (ck.KafkaError.NOT_LEADER_FOR_PARTITION, ck.KafkaError.LEADER_NOT_AVAILABLE)
                if not (err.retriable() or err.code() in passing) or attempt == attempts - 1:
                    raise
                time.sleep(0.25)
        raise AssertionError("unreachable")

    def _read_results(self) -> None:
        """On its own thread: assign every results partition at its end, then
        hand each fetched batch of results to the event loop in one call."""
        ck = _confluent()
        try:
            meta = self._consumer.list_topics(self.results_topic, timeout=30)
            parts = meta.topics[self.results_topic].partitions
            if not parts:
                raise ClientError("no partitions")
            # the end offsets, resolved now: before any request goes out
            tps = [ck.TopicPartition(self.results_topic, p, self._end_offset(ck, p)) for p in parts]
            self._consumer.assign(tps)
        except Exception as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while not self._stop.is_set():
            # consume() waits for a full batch or its timeout: wait for one
            # message, then take whatever else has already arrived
            first = self._consumer.poll(self._poll_timeout_s)
            if first is None:
                continue
            msgs = [first, *self._consumer.consume(num_messages=5000, timeout=0)]
            received = now_ms()
            # A model hand-off's answers arrive together (hundreds, each an
            # embedding: ~25 µs to parse). Parsed in one go they held the
            # GIL, and the event loop's sends waited behind them, late by
            # their schedule: the generator's own delay, measured as the
            # pipeline's. In slices, with the GIL offered between them, the
            # loop's sends and the answers take turns.
            for i in range(0, len(msgs), _HAND_OVER):
                docs = []
                for m in msgs[i : i + _HAND_OVER]:
                    if m.error() is not None:
                        continue
                    try:
                        doc = orjson.loads(m.value())
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(doc, dict):
                        doc["_received_at_ms"] = received
                        docs.append(doc)
                if docs and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._deliver, docs)
                if i + _HAND_OVER < len(msgs):
                    time.sleep(0)  # lets a thread waiting for the GIL take it

    def _deliver(self, docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            fut = self._waiting.pop(doc.get("id"), None)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(doc)

    async def send(self, doc: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        doc.setdefault("sent_at_ms", now_ms())
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[doc["id"]] = fut
        value = orjson.dumps(doc)
        topic, key = destination(self.config, doc)
        try:
            self._producer.produce(topic, value, key)
        except BufferError:  # librdkafka's queue is full: let it drain, then once more
            await asyncio.sleep(0.05)
            self._producer.produce(topic, value, key)
        self._producer.poll(0)  # serves error callbacks; delivery reports are off
        return fut

    async def flush(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._producer.flush, 30.0)

    async def stop(self) -> None:
        self._stop.set()
        if self._reader is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._reader.join, 5.0)
        # librdkafka's threads live (and reconnect) until the handles are
        # closed and dropped
        # (both calls block: off the event loop)
        loop = asyncio.get_running_loop()
        if self._consumer is not None:
            await loop.run_in_executor(None, self._consumer.close)
            self._consumer = None
        if self._producer is not None:
            await loop.run_in_executor(None, self._producer.flush, 10.0)
            self._producer = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ClientError("client stopped before the result arrived"))
        self._waiting.clear()
