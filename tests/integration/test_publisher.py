"""The worker's librdkafka publisher on the real broker."""

from __future__ import annotations

import asyncio

import pytest

from processors.publisher import Publisher, PublishError
from tests.conftest import read_topic

pytestmark = pytest.mark.integration


async def test_acks_resolve_and_records_arrive_keyed_and_in_order(env):
    pub = Publisher(env.stack.bootstrap_servers, client_id="test-publisher", linger_ms=2)
    await pub.start()
    try:
        assert await pub.partitions_for(env.topics.results) == 3
        futs = [await pub.send(env.topics.results, f"v{i}".encode(), f"k{i % 5}".encode()) for i in range(500)]
        assert await asyncio.wait_for(asyncio.gather(*futs), 30) == [None] * 500
        assert await pub.flush(5) == 0
    finally:
        await pub.stop()
    records = await read_topic(env.stack.bootstrap_servers, env.topics.results, expect=500)
    by_key: dict[bytes, list[int]] = {}
    for r in records:
        by_key.setdefault(r.key, []).append(int(r.value[1:]))
    assert sorted(by_key) == [f"k{i}".encode() for i in range(5)]
    for seq in by_key.values():
        assert seq == sorted(seq) and len(seq) == 100  # one partition per key, in send order


async def test_a_record_the_broker_refuses_fails_its_own_future_only(env):
    pub = Publisher(env.stack.bootstrap_servers, client_id="test-publisher", linger_ms=2, max_message_bytes=10_000)
    await pub.start()
    try:
        bad_topic = await pub.send("not a topic!", b"x")
        too_big = await pub.send(env.topics.results, b"x" * 20_000)
        fine = await pub.send(env.topics.results, b"fine", b"k")
        for fut, says in ((bad_topic, "not a topic!"), (too_big, env.topics.results)):
            with pytest.raises(PublishError, match=says):
                await asyncio.wait_for(fut, 30)
        assert await asyncio.wait_for(fine, 30) is None
    finally:
        await pub.stop()
