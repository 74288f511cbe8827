"""The worker's consumer: librdkafka (confluent-kafka) on a thread of its own.

At 1,000 cache hits a second, aiokafka's consumer was the largest part of
the worker's CPU: 0.575 ms per record against librdkafka's 0.208
(`bench/consumer_cpu.py`), the difference being a third of a core on a
two-core machine that the model needs during a cold start.

confluent-kafka serialises the calls on one consumer handle: a `commit()`
from the event loop while another thread sits in `poll()` waits for that poll
to end, and a thread that polls again at once starves it (it hung). So one
thread makes every call on the handle: it polls, hands each fetched batch to
the event loop, makes the commits the loop asks for, pauses and resumes
fetching, runs the rebalance callbacks and closes the handle.

- Records: `await getmany()` returns what was fetched, by partition, as
  librdkafka messages. Fetched records wait in a hand-off buffer; past
  `max_buffered` records the thread pauses every assigned partition (the
  backlog then waits in Kafka, not in memory) and resumes when the loop has
  taken them. The thread keeps polling while paused, so a rebalance is
  served even when the worker is full.
- Commits: `await commit({partition: offset})` is made on the thread,
  synchronously (one round trip); commits asked for meanwhile go as one.
- Rebalances: the revoke callback runs on the thread and blocks it (librdkafka
  hands the partitions over when it returns), while the worker's own revoke
  handler drains on the event loop; the commits that drain asks for are made
  from inside the callback, so they land while the partitions are still ours.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from schemas.errors import SluiceError
from schemas.topics import KafkaConfig

log = logging.getLogger(__name__)

# How long one poll waits for a record: also the longest a commit the loop
# asks for waits before this thread sees it (polls cannot be woken).
_POLL_S = 0.005


class CommitError(SluiceError):
    """A commit the group coordinator refused (the partition moved on)."""

    code = "commit"


class ConsumerError(SluiceError):
    """The consumer thread failed; the worker cannot go on fetching."""

    code = "consumer"


Records = dict[int, list[Any]]  # slot -> confluent_kafka.Message, in offset order


class GroupConsumer:
    """One topic (or every topic a `^regex` names), one consumer group,
    manual commits.

    The stages know a partition by one int, its slot: of one topic, the
    partition number itself; of a pattern's topics (a topic per tenant), a
    number this consumer gives each (topic, partition) it meets, never
    reused, so a slot's state can never be mistaken for another's.
    """

    def __init__(
        self,
        kafka: str | KafkaConfig,
        *,
        group_id: str,
        client_id: str,
        topic: str,
        session_timeout_ms: int,
        max_poll_interval_ms: int,
        fetch_max_wait_ms: int,
        fetch_min_bytes: int,
        max_buffered: int,
        on_assigned: Callable[[set[int]], None],
        on_revoked: Callable[[set[int]], Awaitable[None]],
    ) -> None:
        self.topic = topic
        self._pattern = topic.startswith("^")
        self._slots: dict[tuple[str, int], int] = {}  # written by the thread only
        self._where: dict[int, tuple[str, int]] = {}
        self._conf = {
            **KafkaConfig.of(kafka).rdkafka(),
            "group.id": group_id,
            "client.id": client_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(1000, session_timeout_ms // 4),
            "max.poll.interval.ms": max_poll_interval_ms,
            "fetch.wait.max.ms": fetch_max_wait_ms,
            "fetch.min.bytes": fetch_min_bytes,
            "max.partition.fetch.bytes": 4 << 20,
            # aiokafka's default assignor goes by this name too: workers of
            # an older release (aiokafka) and this one can share a group
            # during a rolling upgrade
            "partition.assignment.strategy": "roundrobin",
            "socket.nagle.disable": True,
            "error_cb": self._on_error,
        }
        if self._pattern:  # a new tenant's topic is found within this long
            self._conf["topic.metadata.refresh.interval.ms"] = 10_000
        self._max_buffered = max_buffered
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Any = None
        self._thread: threading.Thread | None = None
        self._assignment: frozenset[int] = frozenset()
        # the hand-off; two counters, one writer each: the thread counts
        # what it hands over, the loop what it takes (or drops), so the
        # thread never underestimates what is held
        self._fetched: deque[Records] = deque()
        self._handed = 0
        self._taken = 0
        self._arrived = asyncio.Event()
        self._failed: BaseException | None = None
        # asked of the thread by the loop: (offsets, future), or (None,
        # future) for the group metadata
        self._commits: queue.SimpleQueue[tuple[dict[int, int] | None, asyncio.Future]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._paused = False  # the thread's own: fetching paused (hand-off full)
        self._closing = False
        self._stopped: asyncio.Future | None = None

    # -- the loop's side -----------------------------------------------------
    async def start(self) -> None:
        from confluent_kafka import Consumer, KafkaException

        self._loop = asyncio.get_running_loop()
        try:
            self._consumer = Consumer(self._conf)
        except KafkaException as exc:  # a bad option value
            raise ConsumerError(f"consumer {self._conf['client.id']}: {exc}") from None
        self._stopped = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, daemon=True, name="kafka-consumer")
        self._thread.start()

    def assignment(self) -> frozenset[int]:
        return self._assignment

    def where(self, slot: int) -> tuple[str, int]:
        """The (topic, partition) of a slot."""
        return self._where.get(slot, (self.topic, slot)) if self._pattern else (self.topic, slot)

    def topic_partitions(self, offsets: dict[int, int]) -> list[Any]:
        """Slot -> offset as confluent-kafka TopicPartitions."""
        from confluent_kafka import TopicPartition

        return [TopicPartition(*self.where(slot), off) for slot, off in offsets.items()]

    def _slot(self, topic: str, partition: int) -> int:
        if not self._pattern:
            return partition
        slot = self._slots.get((topic, partition))
        if slot is None:
            slot = self._slots[(topic, partition)] = len(self._slots)
            self._where[slot] = (topic, partition)
        return slot

    @property
    def buffered(self) -> int:
        """Records fetched and not yet taken by `getmany`."""
        return self._handed - self._taken

    async def getmany(self, timeout_s: float) -> Records:
        """What was fetched since the last call (waiting up to `timeout_s`
        for something), by partition."""
        if not self._fetched:
            if self._failed is not None:
                raise ConsumerError(f"the consumer stopped: {self._failed}") from self._failed
            self._arrived.clear()
            try:
                # a deadline on this task, not wait_for's task per call: the
                # fetch loop waits here a few hundred times a second
                async with asyncio.timeout(timeout_s):
                    await self._arrived.wait()
            except TimeoutError:
                return {}
            if self._failed is not None and not self._fetched:
                raise ConsumerError(f"the consumer stopped: {self._failed}") from self._failed
        out = self._fetched.popleft()
        while self._fetched:
            for p, msgs in self._fetched.popleft().items():
                out.setdefault(p, []).extend(msgs)
        self._taken += sum(len(m) for m in out.values())
        return out

    async def commit(self, offsets: dict[int, int]) -> None:
        """Commit partition -> next offset to read; raises CommitError if the
        coordinator refuses (the partitions were revoked meanwhile)."""
        assert self._loop is not None
        fut = self._loop.create_future()
        self._commits.put((offsets, fut))
        await fut

    async def group_metadata(self) -> Any:
        """The member's group, generation and id, for a transaction's offsets:
        the coordinator refuses them from a member the group has moved past,
        which fences a worker that lost its partitions (KIP-447). Read on the
        thread, like every call on the handle (from the loop it waits for
        the thread's poll, which never yields it)."""
        assert self._loop is not None
        fut = self._loop.create_future()
        self._commits.put((None, fut))
        return await fut

    async def stop(self) -> None:
        """Make the commits asked for, leave the group and close."""
        if self._thread is None or self._stopped is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), timeout=30)
        except TimeoutError:
            log.warning("consumer: did not close within 30 s")
        self._thread = None

    def _deliver(self, records: Records) -> None:
        self._fetched.append(records)
        self._arrived.set()

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._arrived.set()

    async def _revoke(self, parts: set[int]) -> None:
        # what waits in the hand-off is dropped uncommitted: the next owner
        # reads it again
        kept: deque[Records] = deque()
        for records in self._fetched:
            left = {p: msgs for p, msgs in records.items() if p not in parts}
            self._taken += sum(len(m) for p, m in records.items() if p in parts)
            if left:
                kept.append(left)
        self._fetched = kept
        await self._on_revoked(parts)

    # -- the thread's side ---------------------------------------------------
    def _run(self) -> None:
        loop, c = self._loop, self._consumer
        assert loop is not None
        try:
            c.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._revoked)
            while not self._stopping.is_set():
                self._serve_commits()
                room = self._max_buffered - (self._handed - self._taken)
                if (room <= 0) != self._paused:
                    (c.pause if room <= 0 else c.resume)(c.assignment())
                    self._paused = room <= 0
                # while paused, polls serve rebalances; a record fetched
                # before the pause may still come, and is handed over
                msg = c.poll(_POLL_S)
                if msg is None:
                    continue
                # the first record woke us; the rest already fetched come at once
                rest = c.consume(num_messages=room - 1, timeout=0) if room > 1 else ()
                by: defaultdict[int, list[Any]] = defaultdict(list)
                n = 0
                for m in (msg, *rest):
                    if m.error() is not None:
                        log.warning("consumer: %s", m.error().str())
                        continue
                    by[self._slot(m.topic(), m.partition())].append(m)
                    n += 1
                if n:
                    self._handed += n
                    loop.call_soon_threadsafe(self._deliver, dict(by))
            self._serve_commits()
            self._closing = True
            c.close()  # leaves the group (the revoke callback runs, unheard)
        except BaseException as exc:
            log.exception("consumer thread failed")
            loop.call_soon_threadsafe(self._fail, exc)
        finally:
            loop.call_soon_threadsafe(self._done)

    def _done(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _serve_commits(self) -> None:
        """Make every commit asked for so far, as one."""
        from confluent_kafka import KafkaException

        asked: list[asyncio.Future] = []
        merged: dict[int, int] = {}
        assert self._loop is not None
        while True:
            try:
                offsets, fut = self._commits.get_nowait()
            except queue.Empty:
                break
            if offsets is None:
                self._loop.call_soon_threadsafe(_settle, fut, None, self._consumer.consumer_group_metadata())
                continue
            asked.append(fut)
            for p, off in offsets.items():
                merged[p] = max(merged.get(p, 0), off)
        if not asked:
            return
        error: BaseException | None = None
        try:
            done = self._consumer.commit(offsets=self.topic_partitions(merged), asynchronous=False)
            refused = [f"{tp.topic}/{tp.partition}: {tp.error.str()}" for tp in done or () if tp.error is not None]
            if refused:
                error = CommitError(f"commit refused for partitions {', '.join(refused)}")
        except KafkaException as exc:
            error = CommitError(exc.args[0].str() if exc.args else str(exc))
        for fut in asked:
            self._loop.call_soon_threadsafe(_settle, fut, error)

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        # eager protocol: the whole new assignment (librdkafka assigns it
        # when this returns)
        self._assignment = frozenset(self._slot(tp.topic, tp.partition) for tp in partitions)
        self._paused = False  # a new assignment starts fetching
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_assigned, set(self._assignment))

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        parts = {self._slot(tp.topic, tp.partition) for tp in partitions}
        self._assignment = frozenset()
        if self._closing:
            return  # the worker has drained already
        assert self._loop is not None
        drained = asyncio.run_coroutine_threadsafe(self._revoke(parts), self._loop)
        # The partitions stay ours until this returns: make the drain's
        # commits meanwhile (max.poll.interval.ms bounds how long we may take).
        while not drained.done():
            self._serve_commits()
            try:
                drained.result(timeout=_POLL_S)
            except TimeoutError:
                pass
            except Exception:
                log.exception("revoke handler failed")
                break
        self._serve_commits()

    def _on_error(self, err: Any) -> None:
        # librdkafka reconnects and rejoins by itself
        (log.error if err.fatal() else log.warning)("consumer: %s", err.str())


def _settle(fut: asyncio.Future, error: BaseException | None, value: Any = None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(value)
    else:
        fut.set_exception(error)
