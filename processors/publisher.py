"""The worker's publisher: librdkafka (confluent-kafka) behind asyncio futures.

Every request costs the worker two produces (its result and its telemetry
record), more than anything else it does per cache hit. Under aiokafka the
producer's pure-Python protocol code was a quarter of the worker's CPU at
1,000 hits/s (py-spy); librdkafka builds, batches and sends in C on its own
threads, and keeps up to five requests in flight per broker where aiokafka
keeps one, so a model batch's megabyte of results no longer queues the
hits' answers behind it.

Acks come back as delivery reports, served by `poll()`. Nobody waits on an
ack but the publish stage (before it commits): the client sees a result as
soon as the broker has it. So reports are polled on the event loop, every
`ack_poll_s` while any send is unacknowledged: no thread of ours, no
cross-thread wake-up per report, and futures are resolved where they live.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from schemas.errors import SluiceError
from schemas.service.tasks import supervise
from schemas.topics import KafkaConfig

log = logging.getLogger(__name__)


class PublishError(SluiceError):
    """A record the broker did not take (after librdkafka's own retries)."""

    code = "publish"
    retriable = True


class TransactionAborted(SluiceError):
    """A round's transaction was aborted (or the producer fenced): its
    results are invisible to read_committed readers, and its records must be
    read again from the last committed offsets, which only a restart (or the
    partitions' next owner) does safely: a later round's commit would cover
    them."""

    code = "transaction_aborted"
    retriable = False


class TransactionStuck(TransactionAborted):
    """A transaction call of librdkafka did not return within its own timeout:
    send_offsets_to_transaction, after a broker restart, 3 times in 4 in the
    fault suite (librdkafka#5456: its coordinator requests ignore their
    timeout). The thread in it cannot be stopped, and neither could the
    producer be closed, so the worker ends its process."""

    code = "transaction_stuck"


# How long past its own timeout a transaction call may take before it is
# taken for stuck.
_STUCK_GRACE_S = 10.0


def _on_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future:
    """Run a blocking call on a thread of its own, a daemon: one that never
    returns then keeps neither the loop nor the process's exit waiting, as an
    executor's thread would."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, daemon=True, name="kafka-transaction").start()
    return fut


class Publisher:
    """`fut = await pub.send(topic, value, key)`; `await fut` is the broker's ack."""

    def __init__(
        self,
        kafka: str | KafkaConfig,
        *,
        client_id: str,
        linger_ms: float,
        compression: str = "none",
        max_message_bytes: int = 4 << 20,
        delivery_timeout_ms: int = 30_000,
        ack_poll_s: float = 0.002,
        transactional_id: str | None = None,
        transaction_timeout_ms: int = 10_000,
    ) -> None:
        self.client_id = client_id
        self.transactional_id = transactional_id
        self._conf = {
            **KafkaConfig.of(kafka).rdkafka(),
            "client.id": client_id,
            # acks from every in-sync replica, no duplicates on retry, order kept
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "compression.type": compression,
            "message.max.bytes": max_message_bytes,
            "batch.size": 1 << 20,
            "delivery.timeout.ms": delivery_timeout_ms,
            # Kafka's Java default, as aiokafka and the clients use: a key
            # lands on the same partition whichever client wrote it
            "partitioner": "murmur2_random",
            "socket.nagle.disable": True,
            "error_cb": self._on_error,
        }
        if transactional_id:
            self._conf["transactional.id"] = transactional_id
            # the coordinator aborts a transaction its producer left open this
            # long (a killed worker's): until then read_committed readers of
            # its partitions wait behind it
            self._conf["transaction.timeout.ms"] = transaction_timeout_ms
            self._conf["delivery.timeout.ms"] = min(delivery_timeout_ms, transaction_timeout_ms)
        self._txn_timeout_s = transaction_timeout_ms / 1000
        self._ack_poll_s = ack_poll_s
        self._loop_thread = threading.get_ident()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: Any = None
        self._unacked = 0
        self._wake = asyncio.Event()
        self._poller: asyncio.Task | None = None
        self._failed: PublishError | None = None

    async def start(self) -> None:
        from confluent_kafka import KafkaException, Producer

        try:
            self._producer = Producer(self._conf)
        except KafkaException as exc:  # a bad option value: say which client
            raise PublishError(f"producer {self.client_id}: {exc}") from None
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self.transactional_id:
            # fences an older producer of this id (a worker restarted with
            # the same id) and aborts what it left open
            await self._txn_call("init_transactions", self._txn_timeout_s * 3)
        self._poller = supervise(self._poll_acks(), name=f"acks-{self.client_id}", on_failure=self._poller_failed)

    # -- transactions (exactly-once) ------------------------------------------
    def begin(self) -> None:
        """Open the round's transaction: every send until `commit` is in it."""
        from confluent_kafka import KafkaException

        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            raise TransactionAborted(f"producer {self.client_id}: begin: {exc.args[0].str()}") from None

    async def commit(self, offsets: list[Any], group_metadata: Any) -> None:
        """Commit the open transaction with the consumed `offsets` in it, so
        results, telemetry and offsets become visible together or not at all.
        Every send of the round must be acknowledged first: librdkafka serves
        delivery reports on the thread that commits."""
        await self._txn_call("send_offsets_to_transaction", self._txn_timeout_s, offsets, group_metadata)
        await self._txn_call("commit_transaction", self._txn_timeout_s)

    async def _txn_call(self, name: str, timeout_s: float, *args: Any) -> None:
        from confluent_kafka import KafkaException

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            timeout = max(0.1, deadline - loop.time())
            call = partial(getattr(self._producer, name), *args, timeout)
            try:
                await asyncio.wait_for(_on_daemon_thread(call), timeout + _STUCK_GRACE_S)
                return
            except TimeoutError:
                raise TransactionStuck(
                    f"producer {self.client_id}: {name} did not return within {timeout + _STUCK_GRACE_S:.0f} s"
                ) from None
            except KafkaException as exc:
                err = exc.args[0]
                if err.retriable() and loop.time() < deadline:
                    log.warning("producer %s: %s: %s (retrying)", self.client_id, name, err.str())
                    await asyncio.sleep(0.1)
                    continue
                if err.txn_requires_abort():
                    await self._abort()
                raise TransactionAborted(f"producer {self.client_id}: {name}: {err.str()}") from None

    async def _abort(self) -> None:
        from confluent_kafka import KafkaException

        try:
            call = partial(self._producer.abort_transaction, self._txn_timeout_s)
            await asyncio.wait_for(_on_daemon_thread(call), self._txn_timeout_s + _STUCK_GRACE_S)
        except KafkaException as exc:
            log.error("producer %s: abort failed: %s", self.client_id, exc.args[0].str())
        except TimeoutError:
            raise TransactionStuck(f"producer {self.client_id}: abort_transaction did not return") from None

    async def partitions_for(self, topic: str) -> int:
        """Learn a topic's metadata now, so the first send does not wait for it."""
        meta = await asyncio.get_running_loop().run_in_executor(
            None, partial(self._producer.list_topics, topic, timeout=10)
        )
        found = meta.topics.get(topic)
        if found is None or found.error is not None:
            raise PublishError(f"topic {topic}: {found.error if found else 'unknown'}")
        return len(found.partitions)

    def _poller_failed(self, exc: BaseException) -> None:
        self._failed = PublishError(f"producer {self.client_id}: its delivery reports stopped: {exc!r}")

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future:
        """Queue one record; return the future of its ack (None, or PublishError)."""
        from confluent_kafka import KafkaException

        if self._failed is not None:  # no ack would ever come: say so now
            raise self._failed
        fut = asyncio.get_running_loop().create_future()
        report = partial(self._delivered, fut)
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=report)
                break
            except BufferError:
                # librdkafka's queue (100k records or 1 GiB) is full: serve
                # acks, let its threads drain, and try again
                self._producer.poll(0)
                await asyncio.sleep(self._ack_poll_s)
            except KafkaException as exc:  # refused before queueing (too large): fail like a refused ack
                fut.set_exception(PublishError(f"{topic}: {exc.args[0].str()}"))
                return fut
        self._unacked += 1
        self._wake.set()
        return fut

    def _delivered(self, fut: asyncio.Future, err: Any, msg: Any) -> None:
        if threading.get_ident() != self._loop_thread:
            # a transaction's abort purges what it held and reports it on
            # the aborting thread: settle on the loop, where the future lives
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._delivered, fut, err, msg)
            return
        self._unacked -= 1
        if fut.done():
            return
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(PublishError(f"{msg.topic()}: {err.str()}"))

    def _on_error(self, err: Any) -> None:
        # librdkafka reconnects and retries by itself; a fatal error (the
        # idempotent producer lost its sequence) fails the sends that follow
        if err.fatal():
            log.error("producer %s: fatal: %s", self.client_id, err.str())
        else:
            log.warning("producer %s: %s", self.client_id, err.str())

    async def _poll_acks(self) -> None:
        while True:
            if self._unacked <= 0:
                self._wake.clear()
                await self._wake.wait()
            self._producer.poll(0)
            await asyncio.sleep(self._ack_poll_s)

    async def flush(self, timeout_s: float = 30.0) -> int:
        """Wait until every queued record is acknowledged (or failed); return
        how many were still unacknowledged at the timeout. Polled here rather
        than with librdkafka's flush() in a thread: that would run the
        delivery reports, which resolve asyncio futures, off the event loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self._producer) and loop.time() < deadline:
            self._producer.poll(0)
            await asyncio.sleep(self._ack_poll_s)
        self._producer.poll(0)
        return len(self._producer)

    async def stop(self) -> None:
        if self._producer is None:
            return
        left = await self.flush(10.0)
        if left:
            log.warning("producer %s: %d records unsent at close", self.client_id, left)
        if self._poller is not None:
            self._poller.cancel()
        self._producer = None  # librdkafka closes when the handle is dropped
