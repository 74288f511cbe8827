import asyncio
import time

from prometheus_client import CollectorRegistry

from processors.cache import CacheMetrics, L1Cache, L2Cache, storage_key


def metrics():
    reg = CollectorRegistry()
    return CacheMetrics(reg), reg


def value(reg, name, labels=None):
    return reg.get_sample_value(name, labels or {}) or 0.0


def test_l1_is_bounded_by_bytes_and_counts_evictions():
    m, reg = metrics()
    l1 = L1Cache(max_bytes=1000, ttl_s=60, metrics=m)
    for i in range(5):
        l1.put(f"k{i}", b"x" * 300)  # room for three
    assert [l1.get(f"k{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert value(reg, "sluice_cache_l1_evictions_total") == 2
    l1.update_gauges()
    assert value(reg, "sluice_cache_l1_bytes") == 900


def test_l1_refuses_a_value_larger_than_itself_and_zero_disables():
    m, _ = metrics()
    l1 = L1Cache(max_bytes=100, ttl_s=60, metrics=m)
    l1.put("big", b"x" * 101)
    assert l1.get("big") is None
    off = L1Cache(max_bytes=0, ttl_s=60, metrics=m)
    off.put("k", b"v")
    assert off.get("k") is None


def test_l1_entries_expire():
    m, _ = metrics()
    l1 = L1Cache(max_bytes=1000, ttl_s=0.05, metrics=m)
    l1.put("k", b"v")
    assert l1.get("k") == b"v"
    time.sleep(0.08)
    assert l1.get("k") is None


def test_storage_key_is_namespaced_by_model_version():
    assert storage_key("m@1", "abc") != storage_key("m@2", "abc")
    assert storage_key("m@1", "abc").startswith("sluice:v1:m@1:")


async def test_unreachable_redis_costs_at_most_the_budget_and_backs_off():
    m, reg = metrics()
    # a closed port on loopback: a real refused connection, nothing mocked
    l2 = L2Cache("redis://127.0.0.1:1/0", ttl_s=60, timeout_ms=50, backoff_max_s=0.2, metrics=m)
    await l2.start()
    assert not l2.up and value(reg, "sluice_cache_l2_up") == 0
    assert await l2.get_many(["a", "b"]) == [None, None]
    await l2.put_many([("a", b"1")])
    assert value(reg, "sluice_cache_l2_outages_total") == 1  # one outage, however many errors
    await asyncio.sleep(0.25)  # past the back-off: the next call tries Redis again
    assert await l2.get_many(["a"]) == [None]
    assert value(reg, "sluice_cache_l2_errors_total", {"op": "mget"}) >= 1
    await l2.stop()


async def test_a_hung_redis_is_cut_off_at_the_budget():
    """A server that accepts connections and never answers (a real socket):
    without the budget, MGET would wait forever."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    m, reg = metrics()
    l2 = L2Cache(f"redis://127.0.0.1:{port}/0", ttl_s=60, timeout_ms=50, backoff_max_s=0.2, metrics=m)
    try:
        await l2.start()
        await asyncio.sleep(0.25)  # past the back-off the failed ping started
        values = await asyncio.wait_for(l2.get_many(["a"]), timeout=5)  # fails the test if it hangs
        assert values == [None]
        assert value(reg, "sluice_cache_l2_errors_total", {"op": "mget"}) >= 1
    finally:
        await l2.stop()
        server.close()


async def test_empty_url_disables_l2():
    m, _ = metrics()
    l2 = L2Cache("", ttl_s=60, timeout_ms=50, backoff_max_s=1, metrics=m)
    await l2.start()
    assert not l2.enabled and await l2.get_many(["a"]) == [None]
