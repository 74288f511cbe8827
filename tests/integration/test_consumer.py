"""The worker's librdkafka consumer on the real broker: backpressure,
commits, and a rebalance that commits before the partitions move."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from processors.consumer import GroupConsumer
from processors.publisher import Publisher

pytestmark = pytest.mark.integration


async def _produce(env, n: int) -> dict[int, int]:
    """n records spread over the requests topic's partitions; returns the
    count per partition."""
    pub = Publisher(env.stack.bootstrap_servers, client_id="test-consumer-feed", linger_ms=5)
    await pub.start()
    try:
        futs = [await pub.send(env.topics.requests, f"v{i}".encode(), f"k{i}".encode()) for i in range(n)]
        await asyncio.wait_for(asyncio.gather(*futs), 30)
    finally:
        await pub.stop()
    from tests.conftest import read_topic

    per: dict[int, int] = defaultdict(int)
    for r in await read_topic(env.stack.bootstrap_servers, env.topics.requests, expect=n):
        per[r.partition] += 1
    return dict(per)


def _consumer(env, name: str, *, max_buffered: int = 1000, assigned=None, revoked=None) -> GroupConsumer:
    async def nothing(parts: set[int]) -> None:
        return None

    return GroupConsumer(
        env.stack.bootstrap_servers,
        group_id=f"{env.prefix}-consumers",
        client_id=name,
        topic=env.topics.requests,
        session_timeout_ms=6000,
        max_poll_interval_ms=300_000,
        fetch_max_wait_ms=5,
        fetch_min_bytes=65536,
        max_buffered=max_buffered,
        on_assigned=assigned or (lambda parts: None),
        on_revoked=revoked or nothing,
    )


async def _read(c: GroupConsumer, want: int, timeout_s: float = 30.0) -> dict[int, list[int]]:
    got: dict[int, list[int]] = defaultdict(list)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while sum(map(len, got.values())) < want and loop.time() < deadline:
        for p, msgs in (await c.getmany(0.2)).items():
            got[p].extend(m.offset() for m in msgs)
    return got


async def test_a_full_hand_off_pauses_fetching_and_loses_no_record(env):
    per = await _produce(env, 3000)
    c = _consumer(env, "test-paused", max_buffered=100)
    await c.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while c.buffered == 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert c.buffered > 0, "nothing fetched"
        await asyncio.sleep(2.0)  # nobody takes: the consumer must stop fetching
        # a record fetched just before the pause may still be handed over
        assert c.buffered <= 100 + env.partitions, c.buffered
        got = await _read(c, 3000)
        # resumed each time from where it stopped: every offset once, in order
        assert {p: offs for p, offs in got.items()} == {p: list(range(k)) for p, k in per.items()}
    finally:
        await c.stop()


async def test_a_revoke_commits_what_its_handler_drains_before_the_partitions_move(env):
    """The first member reads everything without committing; when a second
    member joins, its revoke handler commits what it read (through the
    consumer thread, which is inside the rebalance callback meanwhile). The
    second member then starts where the first committed: it reads nothing."""
    n = 600
    await _produce(env, n)
    read: dict[int, int] = {}
    revoked: list[set[int]] = []
    a: GroupConsumer

    async def drain_and_commit(parts: set[int]) -> None:
        revoked.append(parts)
        await a.commit({p: read[p] for p in parts if p in read})

    a = _consumer(env, "test-first", revoked=drain_and_commit)
    await a.start()
    b = _consumer(env, "test-second")
    try:
        got = await _read(a, n)
        assert sum(map(len, got.values())) == n
        read.update({p: max(offs) + 1 for p, offs in got.items()})
        assert a.assignment() == frozenset(range(env.partitions))
        await b.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not (a.assignment() and b.assignment()) and loop.time() < deadline:
            assert not await b.getmany(0.1), "the second member read what the first had committed"
            await a.getmany(0.05)
        assert a.assignment() | b.assignment() == frozenset(range(env.partitions))
        assert not a.assignment() & b.assignment()
        assert revoked and revoked[0] == set(range(env.partitions))
        # a little longer: a late fetch of uncommitted offsets would show here
        for _ in range(10):
            assert not await b.getmany(0.1)
    finally:
        await b.stop()
        await a.stop()


async def test_commits_made_on_the_thread_are_what_the_group_resumes_from(env):
    per = await _produce(env, 300)
    c = _consumer(env, "test-commits")
    await c.start()
    try:
        got = await _read(c, 300)
        # several commits asked for at once go as one; the highest offset wins
        half = {p: len(offs) // 2 for p, offs in got.items()}
        await asyncio.gather(c.commit({p: 1 for p in half}), c.commit(half))
    finally:
        await c.stop()
    again = _consumer(env, "test-commits-again")
    await again.start()
    try:
        rest = await _read(again, sum(per[p] - half[p] for p in per))
        assert {p: offs for p, offs in rest.items()} == {p: list(range(half[p], per[p])) for p in per}
    finally:
        await again.stop()
