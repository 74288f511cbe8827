"""A consumer group's lag on a topic, read from the broker (committed against
end offsets); the autoscaler and the admission stage's overload guard read it."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas.topics import KafkaConfig

log = logging.getLogger(__name__)


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """A topic's partitions, asking the broker once more when the consumer's
    metadata does not know the topic yet (a topic created a moment ago); [] if none."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
    return [TopicPartition(topic, p) for p in sorted(parts or ())]


@dataclass(frozen=True, slots=True)
class GroupOffsets:
    """One reading of the requests topic against the workers' group."""

    end: dict[int, int]  # partition -> next offset to be written
    start: dict[int, int]  # partition -> first offset still in the log
    committed: dict[int, int]  # partition -> the group's committed offset (only where it has one)
    members: int  # consumers in the group now

    @property
    def lag(self) -> dict[int, int]:
        """Records produced and not committed, on partitions the group has committed on
        (and 0 on never-committed partitions whose log is empty: nothing to read there)."""
        return {
            p: max(0, end - self.committed[p]) if p in self.committed else 0
            for p, end in self.end.items()
            if p in self.committed or end <= self.start.get(p, 0)
        }

    @property
    def uncommitted(self) -> dict[int, int]:
        """Partitions the group has never committed on, with records in their log -> how many."""
        return {
            p: end - self.start.get(p, 0)
            for p, end in self.end.items()
            if p not in self.committed and end > self.start.get(p, 0)
        }


class BrokerSignals:
    """End offsets and committed offsets of one topic and group, bounded in time."""

    def __init__(self, kafka: str | KafkaConfig, topic: str, group: str, timeout_s: float = 10.0) -> None:
        self.kafka = KafkaConfig.of(kafka)
        self.topic = topic  # or a `^regex` of topics (a tenant's each), summed
        self._pattern = re.compile(topic) if topic.startswith("^") else None
        self.group = group
        self.timeout_s = timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **self.kafka.aiokafka(),
            group_id=None,
            enable_auto_commit=False,
            client_id="sluice-autoscale",
            request_timeout_ms=int(self.timeout_s * 1000),
        )
        self._admin = AIOKafkaAdminClient(
            **self.kafka.aiokafka(),
            client_id="sluice-autoscale-admin",
            request_timeout_ms=int(self.timeout_s * 1000),
        )
        # a broker that is down at start is one more missing reading, not a crash
        for client in (self._consumer, self._admin):
            try:
                await asyncio.wait_for(client.start(), self.timeout_s)
            except (KafkaError, OSError) as exc:
                log.warning("broker at %s not answering yet: %s", self.kafka.bootstrap_servers, exc)

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        if self._pattern is None:
            return await partitions_of(consumer, self.topic)
        await consumer._client.force_metadata_update()  # a new tenant's topic counts at once
        names = sorted(t for t in consumer._client.cluster.topics() if self._pattern.match(t))
        return [TopicPartition(t, p) for t in names for p in sorted(consumer.partitions_for_topic(t) or ())]

    async def read(self) -> GroupOffsets:
        """One reading; raises KafkaError or OSError (TimeoutError) when the broker does not answer."""
        assert self._consumer is not None and self._admin is not None
        async with asyncio.timeout(self.timeout_s):
            consumer, admin = self._consumer, self._admin
            tps = await self._partitions(consumer)
            if not tps:
                raise KafkaError(f"topic {self.topic} not found")
            # one int per partition, as the group's worker counts them: of one
            # topic its number; of a pattern's topics (one per tenant) its place
            # among them all
            slot = {tp: (i if self._pattern else tp.partition) for i, tp in enumerate(tps)}
            end = {slot[tp]: off for tp, off in (await consumer.end_offsets(tps)).items()}
            start = {slot[tp]: off for tp, off in (await consumer.beginning_offsets(tps)).items()}
            offsets = await admin.list_consumer_group_offsets(self.group, partitions=tps)
            committed = {slot[tp]: om.offset for tp, om in offsets.items() if om is not None and om.offset >= 0}
            members = _members(await admin.describe_consumer_groups([self.group]))
        return GroupOffsets(end=end, start=start, committed=committed, members=members)


def _members(described: list[Any]) -> int:
    """Members of the one group in a DescribeGroups response (0 if it has none or is unknown)."""
    for response in described:
        for group in getattr(response, "groups", []):
            # (error_code, group_id, state, protocol_type, protocol, members, ...)
            if group[0] == 0:
                return len(group[5])
    return 0


class Overload:
    """The workers' backlog against a limit, with hysteresis, read every
    `interval_s`: `overloaded` turns on at `limit` records of lag and off
    under `resume`. The drain rate (committed offsets per second, smoothed)
    says when the excess will have drained: a caller's Retry-After."""

    def __init__(
        self, signals: BrokerSignals, *, limit: int, resume: int, interval_s: float, what: str = "new requests"
    ) -> None:
        self.signals = signals
        self.limit, self.resume, self.interval_s = limit, resume, interval_s
        self.what = what
        self.overloaded = False
        self.lag: int | None = None  # last reading; None until one succeeds
        self.drain_per_s: float | None = None
        self._last: tuple[float, int] | None = None  # (time, committed records) of the previous reading

    def retry_after_s(self, default_s: float, most_s: float = 60.0) -> float:
        """Seconds until the backlog is back under `resume` at the measured drain rate."""
        if self.lag is None or not self.drain_per_s:
            return default_s
        return min(most_s, max(default_s, (self.lag - self.resume) / self.drain_per_s))

    def observe(self, offsets: GroupOffsets, at: float) -> None:
        lag = sum(offsets.lag.values()) + sum(offsets.uncommitted.values())
        committed = sum(offsets.committed.values())
        if self._last is not None and at > self._last[0]:
            rate = max(0.0, committed - self._last[1]) / (at - self._last[0])
            self.drain_per_s = rate if self.drain_per_s is None else 0.7 * self.drain_per_s + 0.3 * rate
        self._last = (at, committed)
        self.lag = lag
        if not self.overloaded and lag >= self.limit:
            self.overloaded = True
            log.warning("overloaded: the workers' lag is %d, refusing %s", lag, self.what)
        elif self.overloaded and lag < self.resume:
            self.overloaded = False
            log.info("overload over: the workers' lag is %d, accepting %s again", lag, self.what)

    async def watch(self, on_reading: Callable[[], None] | None = None) -> None:
        """Read forever (a supervised task); a failed reading keeps the state.
        `on_reading` runs after each successful one (gauges)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.observe(await self.signals.read(), loop.time())
            except (KafkaError, OSError) as exc:
                log.warning("workers' lag unknown (overload state kept): %s", exc)
            else:
                if on_reading is not None:
                    on_reading()
            await asyncio.sleep(self.interval_s)
