"""The control topic: tenants' limits, the global budget and the kill switch.

PREFIX.control is a compacted topic of one partition; the latest record per
key is in force:

    tenant:NAME   TenantLimits (a tombstone removes them: the default applies)
    default       TenantLimits of every tenant without its own
    global        GlobalLimits, over all tenants
    kill_switch   {"on": bool, "reason": str, "at_ms": int}

`sluice tenants` writes it; the admission stage and every worker read it
from the start and then follow it, so a change is in force everywhere
within one poll (a fraction of a second), with no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from processors.admission.limits import GlobalLimits, TenantLimits
from schemas.records import now_ms
from schemas.service.lag import partitions_of
from schemas.topics import KafkaConfig

log = logging.getLogger(__name__)

TENANT_PREFIX = "tenant:"
POLL_MS = 100


@dataclass(frozen=True, slots=True)
class KillSwitch:
    on: bool = False
    reason: str = ""
    at_ms: int = 0


@dataclass
class Control:
    """What the control topic says now."""

    tenants: dict[str, TenantLimits] = field(default_factory=dict)
    default: TenantLimits = field(default_factory=TenantLimits)
    global_limits: GlobalLimits = field(default_factory=GlobalLimits)
    kill_switch: KillSwitch = field(default_factory=KillSwitch)

    def limits_of(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default)

    def apply(self, key: str, value: bytes | None) -> None:
        """One record; a record that does not parse is logged and left out."""
        try:
            doc = orjson.loads(value) if value is not None else None
            if key.startswith(TENANT_PREFIX):
                name = key[len(TENANT_PREFIX) :]
                if doc is None:
                    self.tenants.pop(name, None)
                else:
                    self.tenants[name] = TenantLimits.model_validate(doc)
            elif key == "default":
                self.default = TenantLimits.model_validate(doc or {})
            elif key == "global":
                self.global_limits = GlobalLimits.model_validate(doc or {})
            elif key == "kill_switch":
                doc = doc or {}
                self.kill_switch = KillSwitch(bool(doc.get("on")), str(doc.get("reason", "")), int(doc.get("at_ms", 0)))
            else:
                log.warning("control record with an unknown key %r left out", key)
        except (orjson.JSONDecodeError, ValidationError, TypeError, ValueError) as exc:
            log.warning("control record %r left out: %s", key, str(exc).splitlines()[0])


class ControlView:
    """Follows PREFIX.control in the background; `control` is always the latest."""

    def __init__(
        self, kafka: str | KafkaConfig, topic: str, *, on_change: Callable[[Control, str], None] | None = None
    ) -> None:
        self.kafka = KafkaConfig.of(kafka)
        self.topic = topic
        self.control = Control()
        self._on_change = on_change
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()
        self.following = False

    async def start(self, timeout_s: float = 30.0) -> None:
        """Read the topic to its end, then follow it."""
        await self._start(timeout_s, required=True)

    async def start_if_exists(self, timeout_s: float = 30.0) -> None:
        """As start(), where the topic exists; else `following` stays False."""
        await self._start(timeout_s, required=False)

    async def _start(self, timeout_s: float, required: bool) -> None:
        self._consumer = AIOKafkaConsumer(
            **self.kafka.aiokafka(),
            group_id=None,
            enable_auto_commit=False,
            client_id="sluice-control",
        )
        await self._consumer.start()
        tps = await partitions_of(self._consumer, self.topic)
        if not tps:
            await self._consumer.stop()
            self._consumer = None
            if required:
                raise KafkaError(f"topic {self.topic} not found (`sluice topics` creates it)")
            log.info("no %s topic: the kill switch and tenant limits are not followed", self.topic)
            return
        self.following = True
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        ends = await self._consumer.end_offsets(tps)
        self._task = asyncio.get_running_loop().create_task(self._follow(ends), name="control view")
        await asyncio.wait_for(self.caught_up.wait(), timeout_s)

    async def _follow(self, ends: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        if all(end == 0 for end in ends.values()):
            self.caught_up.set()
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=POLL_MS)
            except KafkaError as exc:  # the broker went away a while: keep the last view
                log.warning("control topic: %s", exc)
                await asyncio.sleep(1)
                continue
            for recs in batches.values():
                for rec in recs:
                    key = rec.key.decode() if rec.key else ""
                    self.control.apply(key, rec.value)
                    if self._on_change is not None and self.caught_up.is_set():
                        self._on_change(self.control, key)
            if not self.caught_up.is_set():
                positions = {tp: await self._consumer.position(tp) for tp in ends}
                if all(positions[tp] >= end for tp, end in ends.items()):
                    self.caught_up.set()

    async def stop(self) -> None:
        await stop_following(self._task, self._consumer)


async def stop_following(task: asyncio.Task[None] | None, consumer: AIOKafkaConsumer | None) -> None:
    """Stop a topic follower: its task, then its consumer."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if consumer is not None:
        await consumer.stop()


async def write_control(kafka: str | KafkaConfig, topic: str, records: dict[str, Any]) -> None:
    """Write control records (key -> document; None removes the key), acknowledged by all replicas."""
    producer = AIOKafkaProducer(**KafkaConfig.of(kafka).aiokafka(), acks="all", client_id="sluice-tenants")
    await producer.start()
    try:
        for key, doc in records.items():
            value = None if doc is None else orjson.dumps(doc)
            await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


def kill_switch_doc(on: bool, reason: str = "") -> dict[str, Any]:
    return {"on": on, "reason": reason, "at_ms": now_ms()}
