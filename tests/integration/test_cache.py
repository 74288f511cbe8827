"""The two-level cache on the real stack: worker processes, Kafka, redis-server."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time

import orjson
import pytest
import redis
from prometheus_client import CollectorRegistry

from processors.cache import CacheMetrics, L2Cache, storage_key
from processors.runtime import BUILTIN_MODELS, load_card
from producers.client import make_request
from producers.corpus import text
from schemas.keys import cache_key, normalise
from tests.conftest import free_port

pytestmark = pytest.mark.integration

CARD = load_card(BUILTIN_MODELS / "all-minilm-l6-v2")


def metric(worker, name: str) -> float:
    total = 0.0
    for line in worker.metrics().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def redis_key(tenant: str, s: str) -> str:
    h = cache_key(scope=tenant, model=CARD.ref, task="embed", labels=None, text=normalise(s, uncased=CARD.uncased))
    return storage_key(CARD.ref, h)


async def eventually(check, timeout_s: float = 5.0) -> bool:
    """The L2 write-back follows the result by a few ms: poll for it."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class OwnRedis:
    """A redis-server of the test's own, to stop, hang and restart at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def dbsize(self) -> int:
        return redis.Redis(port=self.port).dbsize()


@pytest.fixture
def own_redis():
    r = OwnRedis()
    r.start()
    yield r
    r.stop()


async def test_second_pass_is_l1_and_after_restart_l2(worker_factory, client, own_redis):
    texts = [text(i, seed=31) for i in range(120)]
    w1 = worker_factory(SLUICE_REDIS_URL=own_redis.url)
    first = await client.submit_many(texts, tenant="acme")
    assert {r.cache for r in first} <= {"miss", "coalesced"} and all(r.status == "ok" for r in first)
    second = await client.submit_many(texts, tenant="acme")
    assert [r.cache for r in second] == ["l1"] * len(texts)
    assert [r.output for r in second] == [r.output for r in first]
    assert all(r.timings_ms.inference == 0 for r in second)
    assert await eventually(lambda: own_redis.dbsize() >= len(set(texts)))
    w1.stop()

    w2 = worker_factory(SLUICE_REDIS_URL=own_redis.url)  # empty L1, same Redis
    third = await client.submit_many(texts, tenant="acme")
    assert [r.cache for r in third] == ["l2"] * len(texts)
    assert [r.output for r in third] == [r.output for r in first]
    assert metric(w2, 'sluice_cache_hits_total{level="l2"}') == len(texts)


async def test_normalised_variants_share_one_entry_and_one_answer(worker_factory, client, own_redis):
    worker_factory(SLUICE_REDIS_URL=own_redis.url)
    a = await client.submit("  The  Quick brown FOX\tjumps ")
    b = await client.submit("the quick brown fox jumps")
    assert (a.cache, b.cache) == ("miss", "l1")
    assert a.output == b.output


async def test_tenants_never_share_by_default(worker_factory, client, own_redis):
    worker_factory(SLUICE_REDIS_URL=own_redis.url)
    s = "quarterly revenue grew by twelve percent"
    a1 = await client.submit(s, tenant="tenant-a")
    b1 = await client.submit(s, tenant="tenant-b")
    a2 = await client.submit(s, tenant="tenant-a")
    assert (a1.cache, b1.cache, a2.cache) == ("miss", "miss", "l1")
    r = redis.Redis(port=own_redis.port)
    # each tenant got its own L2 entry (written back just after the result went out)
    assert await eventually(lambda: r.exists(redis_key("tenant-a", s)) and r.exists(redis_key("tenant-b", s)))


async def test_shared_cache_is_opt_in_per_model(worker_factory, client, own_redis):
    worker_factory(SLUICE_REDIS_URL=own_redis.url, SLUICE_SHARED_CACHE_MODELS=f'["{CARD.name}"]')
    s = "a sentence any tenant may share"
    a = await client.submit(s, tenant="tenant-a")
    b = await client.submit(s, tenant="tenant-b")
    assert (a.cache, b.cache) == ("miss", "l1") and a.output == b.output


async def test_bypass_skips_lookup_and_write_refresh_overwrites(worker_factory, client, own_redis):
    worker_factory(SLUICE_REDIS_URL=own_redis.url)
    r = redis.Redis(port=own_redis.port)
    s = "bypass never touches the cache"
    by = await client.submit(s, cache="bypass")
    await asyncio.sleep(0.5)  # past any write-back that would have followed
    assert by.cache == "miss" and not r.exists(redis_key("default", s))
    again = await client.submit(s)
    assert again.cache == "miss"  # bypass wrote nothing, not even L1

    # plant a wrong answer in L2 for a fresh text, as a stale entry would be
    s2 = "refresh replaces whatever the cache holds"
    r.set(redis_key("default", s2), orjson.dumps({"embedding": [0.0] * 384}))
    stale = await client.submit(s2)
    assert stale.cache == "l2" and stale.output["embedding"] == [0.0] * 384
    fresh = await client.submit(s2, cache="refresh")
    assert fresh.cache == "miss" and fresh.output["embedding"] != [0.0] * 384
    after = await client.submit(s2)
    assert after.cache == "l1" and after.output == fresh.output
    assert await eventually(lambda: orjson.loads(r.get(redis_key("default", s2))) == fresh.output)


async def test_redis_down_or_hung_mid_run_fails_no_request(worker_factory, client, own_redis):
    w = worker_factory(SLUICE_REDIS_URL=own_redis.url, SLUICE_REDIS_TIMEOUT_MS="50", SLUICE_REDIS_BACKOFF_MAX_S="0.5")
    n, per_phase = 900, 300
    futs = []

    async def send_phase(phase: int) -> None:
        for i in range(per_phase):
            idx = phase * per_phase + i
            futs.append(await client.send(make_request(text(idx % 250, seed=41), id=f"f{idx}")))
            if i % 20 == 0:
                await asyncio.sleep(0.02)

    await send_phase(0)
    await asyncio.sleep(0.5)
    own_redis.proc.send_signal(signal.SIGSTOP)  # hung: accepts nothing, answers nothing
    await send_phase(1)
    await asyncio.sleep(0.5)
    own_redis.stop()  # gone: connections refused
    await send_phase(2)
    docs = await asyncio.wait_for(asyncio.gather(*futs), 120)
    assert len(docs) == n and all(d["status"] == "ok" for d in docs)
    assert metric(w, "sluice_cache_l2_outages_total") >= 1
    assert metric(w, "sluice_cache_l2_up") == 0

    own_redis.start()  # back, empty: the worker returns to L2 and fills it again
    later = [text(1000 + i, seed=41) for i in range(30)]
    deadline = time.monotonic() + 20
    while metric(w, "sluice_cache_l2_up") != 1 and time.monotonic() < deadline:
        await client.submit_many(later[:5])
        await asyncio.sleep(0.3)
    res = await client.submit_many(later)
    assert all(r.status == "ok" for r in res)
    assert metric(w, "sluice_cache_l2_up") == 1
    assert await eventually(lambda: own_redis.dbsize() > 0)


async def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()


async def test_an_l1_hit_is_answered_before_its_batch_is_ready_and_committed_with_it(stack, own_redis):
    """One partition, batches of 4, a 60 s window: a repeat is answered from
    L1 as soon as it is read, while its batch still waits; its offset is
    committed only when that batch is."""
    from producers.client import SluiceClient
    from sluice.admin import ensure_topics
    from tests.conftest import Env, WorkerProcess

    env = Env(stack, f"t{time.time_ns() % 10**10}", partitions=1)
    await ensure_topics(stack.bootstrap_servers, env.topics.partitions(requests=1, results=1, telemetry=1))
    w = WorkerProcess(
        env, SLUICE_REDIS_URL=own_redis.url, SLUICE_BATCH_MAX_ITEMS="4", SLUICE_BATCH_MAX_WAIT_MS="60000"
    ).start()
    group = f"{env.prefix}-workers"
    try:
        async with SluiceClient(env.kafka, timeout_s=20) as client:  # well inside the 60 s window
            texts = [text(i, seed=47) for i in range(8)]
            first = await client.submit_many(texts[:4])  # fills the batch: computed
            assert [r.cache for r in first] == ["miss"] * 4
            deadline = time.monotonic() + 20
            while await _committed(stack.bootstrap_servers, group, env.topics.requests) != 4:
                assert time.monotonic() < deadline, "the first batch was never committed"
                await asyncio.sleep(0.2)
            hit = await client.submit(texts[0])  # alone in a batch that waits 60 s
            assert (hit.cache, hit.output) == ("l1", first[0].output)
            # answered, not committed: offset 4 waits for its batch
            assert await _committed(stack.bootstrap_servers, group, env.topics.requests) == 4
            rest = await client.submit_many(texts[4:7])  # the hit's batch fills: 3 misses
            assert [r.cache for r in rest] == ["miss"] * 3
            deadline = time.monotonic() + 20
            while await _committed(stack.bootstrap_servers, group, env.topics.requests) != 8:
                assert time.monotonic() < deadline, "the batch holding the hit was never committed"
                await asyncio.sleep(0.2)
            assert metric(w, 'sluice_cache_hits_total{level="l1"}') == 1
    finally:
        w.stop()


async def test_l2_write_back_sets_every_entry_with_its_ttl_and_outlives_a_lost_script_cache(own_redis):
    """Write-backs go as script calls of up to 128 keys: every entry lands
    with the TTL, and a server that lost its scripts (a restart, SCRIPT
    FLUSH) is sent the script again instead of failing the write."""
    reg = CollectorRegistry()
    l2 = L2Cache(own_redis.url, ttl_s=90, timeout_ms=2000, backoff_max_s=1, metrics=CacheMetrics(reg))
    await l2.start()
    try:
        entries = [(f"k{i}", f"value {i} ".encode() * 50) for i in range(2500)]  # twenty script calls
        await l2.put_many(entries)
        assert await l2.get_many([k for k, _ in entries]) == [v for _, v in entries]
        server = redis.Redis(port=own_redis.port)
        assert all(0 < server.ttl(k) <= 90 for k, _ in entries[::100])
        server.script_flush()
        await l2.put_many([("after", b"flush")])
        assert await l2.get_many(["after"]) == [b"flush"]
        assert l2.up and reg.get_sample_value("sluice_cache_l2_writes_total") == 2501
        assert not reg.get_sample_value("sluice_cache_l2_errors_total", {"op": "set"})
    finally:
        await l2.stop()
