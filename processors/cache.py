"""The two-level result cache: L1 in-process, L2 Redis shared by all workers.

Values are the serialised `output` JSON of a result, so a hit is spliced into
its result without decoding (orjson.Fragment) and the same bytes serve both
levels. Keys are namespaced by model name and version: a new model version
never serves an old answer, and one version's keys can be dropped alone.

Redis is an optimisation, never a dependency: every L2 call runs under a
time budget, a failure turns L2 off for a back-off period (doubling up to a
ceiling), and requests go on from L1 and the model meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from cachetools import TTLCache
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(
            "sluice_cache_hits_total", "Requests answered from cache, by level.", ["level"], registry=registry
        )
        self.misses = Counter("sluice_cache_misses_total", "Lookups that found nothing.", registry=registry)
        self.coalesced = Counter(
            "sluice_cache_coalesced_total",
            "Requests answered by an identical request's computation in the same hand-off.",
            registry=registry,
        )
        self.evictions = Counter("sluice_cache_l1_evictions_total", "L1 entries evicted for room.", registry=registry)
        self.l1_bytes = Gauge("sluice_cache_l1_bytes", "Bytes held by L1.", registry=registry)
        self.l1_entries = Gauge("sluice_cache_l1_entries", "Entries held by L1.", registry=registry)
        self.l2_errors = Counter(
            "sluice_cache_l2_errors_total", "Failed or timed-out Redis calls.", ["op"], registry=registry
        )
        self.l2_up = Gauge("sluice_cache_l2_up", "1 while Redis answers, 0 during an outage.", registry=registry)
        self.l2_outages = Counter(
            "sluice_cache_l2_outages_total", "Times Redis went from up to down.", registry=registry
        )
        self.l2_writes = Counter("sluice_cache_l2_writes_total", "Entries written to Redis.", registry=registry)


class _BoundedTTL(TTLCache):
    """TTLCache bounded by value bytes, counting evictions for room (not
    expiries, which TTLCache removes without popitem)."""

    def __init__(self, max_bytes: int, ttl_s: float, on_evict) -> None:
        super().__init__(maxsize=max_bytes, ttl=ttl_s, getsizeof=len)
        self._on_evict = on_evict

    def popitem(self):
        item = super().popitem()
        self._on_evict()
        return item


class L1Cache:
    def __init__(self, max_bytes: int, ttl_s: float, metrics: CacheMetrics) -> None:
        self._metrics = metrics
        self._data = _BoundedTTL(max_bytes, ttl_s, metrics.evictions.inc) if max_bytes > 0 else None
        self.max_bytes = max_bytes

    def get(self, key: str) -> bytes | None:
        if self._data is None:
            return None
        return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        if self._data is None or len(value) > self.max_bytes:
            return
        self._data[key] = value

    def update_gauges(self) -> None:
        if self._data is not None:
            self._metrics.l1_bytes.set(self._data.currsize)
            self._metrics.l1_entries.set(len(self._data))


# A batch's write-back as one command instead of a pipeline of SET EX:
# redis-py packs each pipelined command and parses each reply in Python,
# ~40 µs a command on the event loop (512 write-backs held it 21 ms while
# hits waited); a script's arguments pack as one command, its reply is one
# integer (3.6 ms for 512). KEYS are declared, as scripts should.
_SET_ALL_EX = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""
# Keys per script call. Packing a call's arguments is Python work on the
# event loop (~7 µs a key): 128 keys hold it under a millisecond, and the
# wait for each reply lets hits through. It also bounds how long one call
# holds the server, where other workers' lookups wait behind a script.
_WRITE_CHUNK = 128


class L2Cache:
    """Redis behind a timeout budget and a back-off breaker. `url=""` turns L2 off."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        timeout_ms: float,
        backoff_max_s: float,
        metrics: CacheMetrics,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self._options = options or {}  # credentials and TLS, kept out of the URL (and so of logs)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_ms / 1000.0
        self.backoff_max_s = backoff_max_s
        self._metrics = metrics
        self._redis: Any = None  # a redis.asyncio client, once started
        self._set_all: Any = None  # the write-back script, once registered
        self._retry_at = 0.0
        self._backoff_s = 0.0
        self.up = False

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    async def start(self) -> None:
        if not self.url:
            return
        import redis.asyncio as aioredis

        # The client's own timeouts match the budget so a hung server frees
        # its connection; the budget itself is enforced around each call.
        self._redis = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
            max_connections=8,
            **self._options,
        )
        # EVALSHA, and EVAL once more if the server lost its script cache (a restart)
        self._set_all = self._redis.register_script(_SET_ALL_EX)
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                await self._redis.ping()
            self._mark_up()
        except Exception as exc:  # redis-py raises several unrelated types
            self._mark_down("ping", exc)

    async def stop(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _available(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._retry_at

    def _mark_up(self) -> None:
        if not self.up:
            log.info("L2 cache: redis %s answering", self.url)
        self.up = True
        self._backoff_s = 0.0
        self._metrics.l2_up.set(1)

    def _mark_down(self, op: str, exc: BaseException) -> None:
        self._metrics.l2_errors.labels(op).inc()
        if self.up or self._backoff_s == 0.0:
            self._metrics.l2_outages.inc()
            log.warning(
                "L2 cache: redis %s failed (%s: %s); serving from L1 and the model", op, type(exc).__name__, exc
            )
        self.up = False
        self._metrics.l2_up.set(0)
        self._backoff_s = min(self.backoff_max_s, max(0.1, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One MGET; on any failure or timeout, all misses."""
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            async with asyncio.timeout(self.timeout_s):
                values = await self._redis.mget(keys)
        except Exception as exc:
            self._mark_down("mget", exc)
            return [None] * len(keys)
        self._mark_up()
        return values

    async def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """SET EX of every entry, one script call (one round trip) per
        `_WRITE_CHUNK`; failures are counted, not raised."""
        items = list(items)
        if not items or not self._available():
            return
        try:
            for i in range(0, len(items), _WRITE_CHUNK):
                chunk = items[i : i + _WRITE_CHUNK]
                async with asyncio.timeout(self.timeout_s):
                    await self._set_all(
                        keys=[k for k, _ in chunk],
                        args=[self.ttl_s, *(v for _, v in chunk)],
                    )
                self._metrics.l2_writes.inc(len(chunk))
        except Exception as exc:
            self._mark_down("set", exc)
            return
        self._mark_up()


def storage_key(model_ref: str, key_hash: str) -> str:
    """Redis key: namespaced by model@version (drop one version with SCAN/UNLINK)."""
    return f"sluice:v1:{model_ref}:{key_hash}"
