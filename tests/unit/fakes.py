"""In-memory stand-ins for the worker stages' unit tests: a consumer's
records and commits, a publisher's sends and acks, the model process and
Redis. Each only records what our code asked of it; the integration tests
run the same stages on the real broker, Redis and model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from processors.cache import CacheMetrics, L1Cache, L2Cache
from processors.config import WorkerConfig
from processors.metrics import WorkerMetrics
from processors.model_process import Computed, Job, ModelRun, Outcome
from processors.runtime import ModelCard
from schemas.topics import Topics


class Message:
    """A record as librdkafka hands it over."""

    def __init__(self, offset: int, value: bytes | None, key: bytes | None = None, ts_ms: int = 1_000) -> None:
        self._offset, self._value, self._key, self._ts = offset, value, key, ts_ms

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)


def request(i: int | str, text: str = "hello", **over: Any) -> bytes:
    return orjson.dumps({"v": 1, "id": f"r{i}", "input": text, **over})


class Log(list):
    """What happened, in order, across the fakes: ('send', topic, id), ('ack', topic, id), ..."""


class FakePublisher:
    """Sends are acked at once, unless the topic is in `fail` (the ack fails)
    or `hold` is set (acks wait until it is released)."""

    def __init__(self, log: Log, name: str = "results") -> None:
        self.log = log
        self.name = name
        self.sent: list[tuple[str, dict[str, Any], bytes | None]] = []
        self.fail: dict[str, BaseException] = {}
        self.hold: asyncio.Event | None = None
        self._waiting: list[asyncio.Future] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future:
        doc = orjson.loads(value)
        self.sent.append((topic, doc, key))
        self.log.append(("send", topic, doc.get("id")))
        fut: asyncio.Future = asyncio.get_running_loop().create_future()

        def settle() -> None:
            if topic in self.fail:
                fut.set_exception(self.fail[topic])
            else:
                self.log.append(("ack", topic, doc.get("id")))
                fut.set_result(None)

        if self.hold is None:
            settle()
        else:
            hold = self.hold

            async def later() -> None:
                await hold.wait()
                settle()

            self._waiting.append(asyncio.ensure_future(later()))
        return fut

    def docs(self, topic: str) -> list[dict[str, Any]]:
        return [d for t, d, _ in self.sent if t == topic]


class FakeConsumer:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.batches: list[dict[int, list[Message]]] = []
        self.commits: list[dict[int, int]] = []

    async def getmany(self, timeout_s: float) -> dict[int, list[Message]]:
        if self.batches:
            return self.batches.pop(0)
        await asyncio.sleep(min(timeout_s, 0.001))
        return {}

    async def commit(self, offsets: dict[int, int]) -> None:
        self.log.append(("commit", dict(offsets)))
        self.commits.append(dict(offsets))

    def where(self, slot: int) -> tuple[str, int]:
        return "requests", slot

    def topic_partitions(self, offsets: dict[int, int]) -> list[Any]:
        return [(*self.where(slot), off) for slot, off in offsets.items()]


class FakeModel:
    """Computes each job as [len(text)]; a text containing 'poison' fails.
    `between` is awaited before each piece after the first, so a test can
    see what was answered while the model still worked."""

    def __init__(self, log: Log, seconds_per_token: float = 0.001) -> None:
        self.log = log
        self.pieces: list[list[Job]] = []
        self.seconds_per_token = seconds_per_token
        self.between: Any = None

    async def compute_pieces(self, pieces: list[list[Job]]) -> AsyncGenerator[Computed, None]:
        for n, jobs in enumerate(pieces):
            if n and self.between is not None:
                await self.between()
            self.pieces.append(jobs)
            self.log.append(("compute", [j.text for j in jobs]))
            outcomes, runs = [], {}
            for j in jobs:
                tokens = len(j.text.split())
                if "poison" in j.text:
                    outcomes.append(Outcome(tokens=tokens, error="the model raised: poison"))
                elif "nothing" in j.text:  # a runtime that lost a row: neither output nor error
                    outcomes.append(Outcome(tokens=tokens))
                else:
                    outcomes.append(Outcome(tokens=tokens, out=orjson.dumps({"embedding": [len(j.text)]})))
                run = runs.setdefault(j.model, ModelRun(start_ms=10, end_ms=20))
                run.seconds += tokens * self.seconds_per_token
                run.sub_batches = 1
                run.padded_tokens += tokens
            yield Computed(outcomes, runs)


class FakeL2:
    """Redis as a dict; counts MGETs and writes."""

    enabled = True

    def __init__(self, log: Log, data: dict[str, bytes] | None = None) -> None:
        self.log = log
        self.data = dict(data or {})
        self.gets: list[list[str]] = []

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        self.gets.append(list(keys))
        return [self.data.get(k) for k in keys]

    async def put_many(self, items: list[tuple[str, bytes]]) -> None:
        self.log.append(("l2", len(items)))
        self.data.update(items)


def card(name: str = "mini", tasks: tuple[str, ...] = ("embed",), price: float = 3.6) -> ModelCard:
    return ModelCard(
        name=name,
        version="1",
        tasks=tasks,
        uncased=True,  # type: ignore[arg-type]
        price_per_compute_hour_usd=price,
    )


def config(**over: Any) -> WorkerConfig:
    base: dict[str, Any] = dict(
        topic_prefix="t",
        default_model="mini",
        redis_url="",
        worker_id="w1",
        batch_max_items=64,
        batch_max_wait_ms=0,
        publish_slice_gap_ms=0,
    )
    return WorkerConfig(**{**base, **over})


def caches(metrics: WorkerMetrics) -> tuple[CacheMetrics, L1Cache, L2Cache]:
    cm = CacheMetrics(metrics.registry)
    return cm, L1Cache(1 << 20, 60, cm), L2Cache("", ttl_s=60, timeout_ms=50, backoff_max_s=1, metrics=cm)


TOPICS = Topics("t")
