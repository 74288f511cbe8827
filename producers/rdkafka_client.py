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
same worker and cache, whichever client sent it. The gateway answers its
HTTP calls through it, on a reply topic of its own (`reply_topic`).

A wait that is cancelled (timed out) is forgotten. A reader that fails fails
the waiting calls at once and starts again at the topic's end; requests sent
meanwhile wait for it to be positioned.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import orjson

from producers.client import ClientError, destination, requests_topic_of, results_topic_of
from producers.replies import Waiting, delete_reply_topic, ensure_reply_topic
from schemas.records import now_ms
from schemas.topics import KafkaConfig

log = logging.getLogger(__name__)

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
        reply_topic: str | None = None,
        reply_partitions: int = 1,
        reply_retention_ms: int = 3_600_000,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.config = config or KafkaConfig()
        self.topics = self.config.topics
        # a reply topic of its own is made at start and removed at stop
        self.reply_topic = reply_topic
        self._reply_topic_spec = {"partitions": reply_partitions, "retention_ms": reply_retention_ms}
        self._made_reply_topic = False
        self.results_topic = reply_topic or results_topic_of(self.config)
        self._start_timeout_s = start_timeout_s
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
        self._waiting = Waiting()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()  # the first reader is positioned (or failed to be)
        self._reading = asyncio.Event()  # a reader is positioned now
        self._error: BaseException | None = None
        self.restarts = 0  # readers started again after a failure

    @property
    def pending(self) -> int:
        """Requests sent and still waited for."""
        return len(self._waiting)

    @property
    def reading(self) -> bool:
        """A results reader is positioned and fetching."""
        return self._reading.is_set()

    async def __aenter__(self) -> RdKafkaClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        ck = _confluent()
        self._loop = loop = asyncio.get_running_loop()
        servers = self.config.rdkafka()
        if self.reply_topic:
            self._made_reply_topic = await loop.run_in_executor(
                None, lambda: ensure_reply_topic(self.config, self.reply_topic or "", **self._reply_topic_spec)
            )
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
        # metadata for the requests topic now, not at the first send
        await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: self._producer.list_topics(requests_topic_of(self.config), timeout=10),
        )
        self._reader = threading.Thread(target=self._read_results, name="sluice-rdkafka-results", daemon=True)
        self._reader.start()
        ready = await asyncio.get_running_loop().run_in_executor(None, self._ready.wait, self._start_timeout_s)
        if self._error is not None:
            raise ClientError(f"results topic {self.results_topic!r}: {self._error}")
        if not ready:
            raise ClientError(
                f"results topic {self.results_topic!r} not readable on {servers} "
                f"within {self._start_timeout_s:g} s (is the stack up? `sluice up`)"
            )
        self._reading.set()

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

    def _new_consumer(self) -> Any:
        ck = _confluent()
        return ck.Consumer(
            {
                **self.config.rdkafka(),
                # assign() only: the group is never joined and nothing is committed
                "group.id": f"sluice-replies-{now_ms()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": False,
                "socket.nagle.disable": True,
                **self._fetch,
            }
        )

    def _position(self) -> None:
        """A new consumer assigned every results partition at its end offset,
        resolved now: before any request it is to answer goes out."""
        ck = _confluent()
        self._consumer = self._new_consumer()
        meta = self._consumer.list_topics(self.results_topic, timeout=30)
        topic = meta.topics.get(self.results_topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise ClientError(f"no partitions ({topic.error if topic is not None else 'no such topic'})")
        tps = [ck.TopicPartition(self.results_topic, p, self._end_offset(ck, p)) for p in topic.partitions]
        self._consumer.assign(tps)

    def _read_results(self) -> None:
        """On its own thread: position a reader, then hand each fetched batch
        of results to the event loop in one call. A reader that fails fails
        the waiting calls and is replaced (with a backoff)."""
        try:
            self._position()
        except Exception as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._signal(self._reading.set)
        self._ready.set()
        while not self._stop.is_set():
            try:
                self._fetch_until_stopped()
                return
            except Exception as exc:
                log.error("results reader failed, starting it again: %r", exc, exc_info=exc)
                self._signal(self._reading.clear)
                self._signal(self._waiting.fail_all, ClientError(f"the results reader failed: {exc!r}"))
                self.restarts += 1
                self._close_consumer()
            while not self._stop.is_set():
                self._stop.wait(min(5.0, 0.2 * 2 ** min(self.restarts, 5)))
                try:
                    self._position()
                except Exception as exc:
                    log.warning("results reader not positioned yet: %r", exc)
                    self._close_consumer()
                    continue
                self._signal(self._reading.set)
                break

    def _signal(self, fn: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close()
            except Exception as exc:
                log.warning("closing the failed results reader: %r", exc)

    def _fetch_until_stopped(self) -> None:
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
                        if m.error().fatal():
                            raise ClientError(str(m.error()))
                        continue
                    try:
                        doc = orjson.loads(m.value())
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(doc, dict):
                        doc["_received_at_ms"] = received
                        docs.append(doc)
                if docs:
                    self._signal(self._deliver, docs)
                if i + _HAND_OVER < len(msgs):
                    time.sleep(0)  # lets a thread waiting for the GIL take it

    def _deliver(self, docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            self._waiting.resolve(doc)

    async def send(self, doc: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        if not self._reading.is_set():  # a reader being replaced: its position comes first
            try:
                await asyncio.wait_for(self._reading.wait(), self._start_timeout_s)
            except TimeoutError:
                raise ClientError(f"no results reader on {self.results_topic!r}") from None
        doc.setdefault("sent_at_ms", now_ms())
        if self.reply_topic:
            doc.setdefault("reply_to", self.reply_topic)
        value = orjson.dumps(doc)
        topic, key = destination(self.config, doc)
        fut = self._waiting.add(doc["id"])
        try:
            try:
                self._producer.produce(topic, value, key)
            except BufferError:  # librdkafka's queue is full: let it drain, then once more
                await asyncio.sleep(0.05)
                self._producer.produce(topic, value, key)
        except BaseException:
            self._waiting.forget(doc["id"])
            raise
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
        await loop.run_in_executor(None, self._close_consumer)
        if self._producer is not None:
            await loop.run_in_executor(None, self._producer.flush, 10.0)
            self._producer = None
        self._waiting.fail_all(ClientError("client stopped before the result arrived"))
        if self._made_reply_topic and self.reply_topic:
            await loop.run_in_executor(None, delete_reply_topic, self.config, self.reply_topic)
            self._made_reply_topic = False
