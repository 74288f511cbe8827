"""ensure_topics on the real broker: idempotent, min.insync.replicas set,
a short topic grown, a replication factor the one-node broker cannot give
refused with a line that names it."""

from __future__ import annotations

import logging
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from sluice.admin import ensure_topics
from sluice.errors import StackError

pytestmark = pytest.mark.integration


async def _describe(bootstrap: str, names: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Partition counts, and each topic's min.insync.replicas."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        counts = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n, configs={"min.insync.replicas": None}) for n in names]
        )
        insync = {}
        for response in configs:
            for resource in response.resources:
                name, entries = resource[3], resource[4]
                insync[name] = next(e[1] for e in entries if e[0] == "min.insync.replicas")
        return counts, insync
    finally:
        await admin.close()


async def test_ensure_topics_is_idempotent_and_sets_min_insync(stack) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    wanted = {f"{prefix}.a": 3, f"{prefix}.b": 1}
    assert sorted(await ensure_topics(stack.bootstrap_servers, wanted)) == sorted(wanted)
    assert await ensure_topics(stack.bootstrap_servers, wanted) == []  # nothing new the second time
    counts, insync = await _describe(stack.bootstrap_servers, sorted(wanted))
    assert counts == wanted
    assert insync == {name: "1" for name in wanted}


async def test_a_short_topic_is_grown_and_said_so(stack, caplog) -> None:
    name = f"t{uuid.uuid4().hex[:10]}.requests"
    await ensure_topics(stack.bootstrap_servers, {name: 2})
    with caplog.at_level(logging.WARNING, logger="sluice.admin"):
        assert await ensure_topics(stack.bootstrap_servers, {name: 4}) == []
    assert f"topic {name}: growing from 2 to 4 partitions" in caplog.text
    assert (await _describe(stack.bootstrap_servers, [name]))[0] == {name: 4}
    # more partitions than asked are left alone (Kafka cannot remove them)
    assert await ensure_topics(stack.bootstrap_servers, {name: 1}) == []
    assert (await _describe(stack.bootstrap_servers, [name]))[0] == {name: 4}


async def test_a_replication_factor_beyond_the_brokers_is_refused_by_name(stack) -> None:
    name = f"t{uuid.uuid4().hex[:10]}.requests"
    with pytest.raises(StackError, match=f"could not create topic '{name}'.*replication factor 3"):
        await ensure_topics(stack.bootstrap_servers, {name: 1}, replication_factor=3, min_insync_replicas=2)


async def test_a_different_replication_factor_is_reported(stack, caplog) -> None:
    name = f"t{uuid.uuid4().hex[:10]}.results"
    await ensure_topics(stack.bootstrap_servers, {name: 1})
    with caplog.at_level(logging.WARNING, logger="sluice.admin"):
        # the topic exists, so nothing is created: the mismatch is only reported
        assert (
            await ensure_topics(stack.bootstrap_servers, {name: 1}, replication_factor=3, min_insync_replicas=2) == []
        )
    assert f"topic {name} has replication factor 1, SLUICE_TOPIC_REPLICATION_FACTOR is 3" in caplog.text


async def test_lag_under_tenant_topics_counts_every_tenants_partitions(stack):
    """The autoscaler's reading with SLUICE_TENANT_TOPICS: every
    PREFIX.requests.TENANT partition, a new tenant's at once, and not the
    shared PREFIX.requests."""
    from aiokafka import AIOKafkaProducer

    from schemas.service.lag import BrokerSignals
    from schemas.topics import KafkaConfig

    kafka = KafkaConfig(bootstrap_servers=stack.bootstrap_servers, topic_prefix=f"lag{uuid.uuid4().hex[:8]}")
    t = kafka.topics
    await ensure_topics(kafka, {t.tenant_requests("a"): 2, t.tenant_requests("b"): 3, t.requests: 4})
    producer = AIOKafkaProducer(**kafka.aiokafka())
    await producer.start()
    try:
        for _ in range(5):
            await producer.send_and_wait(t.tenant_requests("b"), b"{}", partition=2)
        signals = BrokerSignals(kafka, t.tenant_requests_pattern, f"{t.prefix}-workers")
        await signals.start()
        try:
            first = await signals.read()
            assert len(first.end) == 5 and sum(first.uncommitted.values()) == 5
            await ensure_topics(kafka, {t.tenant_requests("c"): 1})
            await producer.send_and_wait(t.tenant_requests("c"), b"{}")
            second = await signals.read()
            assert len(second.end) == 6 and sum(second.uncommitted.values()) == 6
        finally:
            await signals.close()
    finally:
        await producer.stop()
