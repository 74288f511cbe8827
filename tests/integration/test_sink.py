"""The ClickHouse sink on the real stack: a Kafka broker and real chDB.

The sink runs as operators run it (`python -m sinks`, a subprocess), and
the tests ask it through its POST /query endpoint, the way other processes
read the database the sink owns."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from schemas.records import Telemetry, now_ms
from sluice import supervisor
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

N = 3000


def telemetry(i: int, base_ms: int) -> dict:
    rnd = random.Random(i)
    status = rnd.choice(["ok"] * 8 + ["error", "expired"])
    cache = rnd.choice(["l1", "l2", "coalesced", "miss", "none"])
    sent = base_ms + i
    doc = {
        "v": 1,
        "id": f"req-{uuid.uuid4().hex}",
        "tenant": rnd.choice(["acme", "beta", "corp", "default"]),
        "model": rnd.choice(["all-minilm-l6-v2", "all-minilm-l6-v2-sq8"]),
        "model_version": "1",
        "task": rnd.choice(["embed", "classify"]),
        "status": status,
        "error_code": "model_error" if status == "error" else "",
        "cache": cache,
        "tokens": rnd.randint(1, 200),
        "batch_size": rnd.randint(1, 64),
        "worker": f"w{rnd.randint(1, 3)}",
        "partition": rnd.randint(0, 11),
        "offset": i,
        "sent_at_ms": sent,
        "received_at_ms": sent + 1,
        "inference_start_ms": sent + 2,
        "inference_end_ms": sent + 9,
        "published_at_ms": sent + 10,
        "queue_ms": 2.0,
        "cache_ms": 0.3,
        "inference_ms": 7.0,
        "total_ms": 10.0 + rnd.random() * 50,
        "compute_ms": 1.5,
        "cost_usd": rnd.random() * 1e-5,
    }
    Telemetry.model_validate(doc)
    return doc


async def produce(bootstrap: str, topic: str, docs: list[dict], extra: list[bytes] = ()) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futs = [await producer.send(topic, orjson.dumps(d)) for d in docs]
        futs += [await producer.send(topic, raw) for raw in extra]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


class SinkProcess(supervisor.WorkerProcess):
    """`sluice sink` on the test's topics and its own chDB folder."""

    def __init__(self, env, chdb_path: Path, group: str, **settings: str) -> None:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"sluice-sink-{env.prefix}-{uuid.uuid4().hex[:6]}.log"
        super().__init__(
            {
                "SLUICE_BOOTSTRAP_SERVERS": env.stack.bootstrap_servers,
                "SLUICE_TOPIC_PREFIX": env.prefix,
                "SLUICE_SINK_GROUP_ID": group,
                "SLUICE_CHDB_PATH": str(chdb_path),
                **settings,
            },
            log_path=log,
            cwd=ROOT,
            command="sink",
        )

    def start(self, timeout_s: float = 30.0) -> SinkProcess:  # type: ignore[override]
        try:
            super().start(timeout_s)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None
        return self

    def query(self, sql: str) -> tuple[list[str], list[list]]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/query",
            data=orjson.dumps({"sql": sql}),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            doc = orjson.loads(r.read())
        return doc["columns"], doc["rows"]

    def counts(self) -> tuple[int, int]:
        _, rows = self.query("SELECT count(), uniqExact(id) FROM sluice.telemetry")
        return rows[0][0], rows[0][1]

    def wait_rows(self, n: int, timeout_s: float = 30.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout_s
        got = (-1, -1)
        while time.monotonic() < deadline:
            got = self.counts()
            if got[0] >= n:
                time.sleep(1.5)  # anything more (a duplicate) would arrive within a flush or two
                return self.counts()
            time.sleep(0.1)
        raise AssertionError(f"{got[0]} rows after {timeout_s} s, expected {n}\n{self.log()}")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def log(self) -> str:
        p = self.log_path
        return p.read_text(errors="replace")[-5000:] if p is not None and p.exists() else ""


@pytest.fixture
def sinks():
    started: list[SinkProcess] = []

    def make(*args, **kw) -> SinkProcess:
        s = SinkProcess(*args, **kw)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.stop()


@pytest.mark.timeout(60)
async def test_n_records_become_exactly_n_rows(env, sinks, tmp_path):
    base = now_ms() - 60_000
    docs = [telemetry(i, base) for i in range(N)]
    bad = [b"not json", orjson.dumps({"v": 1, "id": "half a record"})]
    await produce(env.stack.bootstrap_servers, env.topics.telemetry, docs, bad)

    sink = sinks(env, tmp_path / "chdb", f"{env.prefix}-sink")
    rows, ids = await asyncio.to_thread(sink.wait_rows, N)
    assert (rows, ids) == (N, N)
    # the same figures as the records say
    cols, got = sink.query(
        "SELECT tenant, count(), round(sum(cost_usd), 9), sum(tokens) FROM sluice.telemetry "
        "GROUP BY tenant ORDER BY tenant"
    )
    assert len(cols) == 4
    want = {}
    for d in docs:
        w = want.setdefault(d["tenant"], [0, 0.0, 0])
        w[0] += 1
        w[1] += d["cost_usd"]
        w[2] += d["tokens"]
    assert [r[0] for r in got] == sorted(want)
    for tenant, n, cost, tokens in got:
        assert n == want[tenant][0] and tokens == want[tenant][2]
        assert cost == pytest.approx(want[tenant][1], abs=1e-8)
    _, minute = sink.query("SELECT sum(requests) FROM sluice.telemetry_minute")
    assert minute[0][0] == N
    assert sink.metric("sluice_sink_errors_total") == 2  # the bad records: counted and skipped
    assert sink.stop() == 0
    # the bad records were committed with the rest: a restart reads nothing new
    again = sinks(env, tmp_path / "chdb", f"{env.prefix}-sink")
    await asyncio.sleep(2)
    assert again.counts() == (N, N)
    assert again.metric("sluice_sink_errors_total") == 0


def post_query(port: int, sql: str, token: str | None = None) -> tuple[int, dict, dict]:
    """POST /query as any HTTP client would: (status, JSON body, headers)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/query", data=orjson.dumps({"sql": sql}), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, orjson.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read()), dict(exc.headers)


@pytest.mark.timeout(120)
async def test_the_query_endpoint_refuses_files_network_writes_and_runaway_scans(env, sinks, tmp_path):
    """The attacks a new user tried on POST /query, each refused; the named
    queries still answered; a scan past its budget stopped by ClickHouse while
    the sink keeps inserting telemetry meanwhile."""
    from sinks.analytics import load_queries
    from tests.unit.test_store import ATTACKS, HEAVY_SCAN

    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-leak-7f3a\n")
    out = tmp_path / "written.txt"
    sink = sinks(
        env, tmp_path / "chdb", f"{env.prefix}-sink", SLUICE_SINK_QUERY_TIMEOUT_S="6", SLUICE_SINK_BATCH_MAX_S="0.2"
    )
    for attack, sql in ATTACKS.items():
        status, doc, _ = post_query(sink.port, sql.format(secret=secret, out=out, db="sluice"))
        assert status == 400, (attack, doc)
        assert "do-not-leak" not in orjson.dumps(doc).decode(), attack
    assert not out.exists()
    assert sink.metric('sluice_sink_queries_total{outcome="refused"}') == len(ATTACKS)
    assert sink.metric('sluice_sink_queries_total{outcome="ok"}') == 0
    assert sink.query("SELECT 1 AS one") == (["one"], [[1]])
    for name, q in load_queries().items():
        status, doc, _ = post_query(sink.port, q.render(db="sluice", since_s=3600))
        assert status == 200 and doc["columns"], (name, doc)

    # a scan that would run ~30 s on one core, started before the telemetry arrives
    scan = asyncio.create_task(asyncio.to_thread(post_query, sink.port, HEAVY_SCAN.format(rows=30_000_000)))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await produce(
        env.stack.bootstrap_servers, env.topics.telemetry, [telemetry(i, now_ms() - 60_000) for i in range(N)]
    )
    rows, _ = await asyncio.to_thread(sink.wait_rows, N, 20.0)
    stored_s = time.monotonic() - started
    assert not scan.done(), "the scan ended before the inserts could be seen to pass it"
    status, doc, _ = await scan
    assert rows == N
    assert status == 400 and "TIMEOUT_EXCEEDED" in doc["error"], doc
    assert stored_s < 6.0


@pytest.mark.timeout(90)
async def test_the_query_endpoint_asks_for_its_token_and_sheds_excess_queries(env, sinks, tmp_path):
    from tests.unit.test_store import HEAVY_SCAN

    sink = sinks(
        env,
        tmp_path / "chdb",
        f"{env.prefix}-sink",
        SLUICE_SINK_QUERY_TOKEN="t0ken-9c1e",
        SLUICE_SINK_QUERY_CONCURRENCY="1",
        SLUICE_SINK_QUERY_TIMEOUT_S="4",
    )
    for token in (None, "wrong", ""):
        status, doc, headers = post_query(sink.port, "SELECT 1 AS one", token)
        assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer"), doc
    assert post_query(sink.port, "SELECT 1 AS one", "t0ken-9c1e")[:2] == (200, {"columns": ["one"], "rows": [[1]]})
    # health and metrics stay open to probes and Prometheus
    with urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/readyz", timeout=5) as r:
        assert r.status == 200
    # one query at a time: a second one while a scan runs is told to come back
    scan = asyncio.create_task(
        asyncio.to_thread(post_query, sink.port, HEAVY_SCAN.format(rows=30_000_000), "t0ken-9c1e")
    )
    await asyncio.sleep(1.0)
    status, doc, headers = post_query(sink.port, "SELECT 1 AS one", "t0ken-9c1e")
    assert status == 429 and headers.get("Retry-After") == "1", doc
    assert (await scan)[0] == 400
    assert post_query(sink.port, "SELECT 1 AS one", "t0ken-9c1e")[0] == 200
    # the token never shows in the sink's log
    assert "t0ken-9c1e" not in sink.log()


def test_a_sink_listening_beyond_loopback_without_a_token_does_not_start(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "sluice", "sink"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "SLUICE_SINK_HOST": "0.0.0.0",
            "SLUICE_SINK_PORT": "0",
            "SLUICE_CHDB_PATH": str(tmp_path / "chdb"),
        },
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SLUICE_SINK_QUERY_TOKEN" in lines[0], proc.stderr


@pytest.mark.timeout(60)
async def test_sigkill_mid_stream_and_restart_leaves_exactly_n_rows(env, sinks, tmp_path):
    base = now_ms() - 60_000
    docs = [telemetry(i, base) for i in range(N)]
    await produce(env.stack.bootstrap_servers, env.topics.telemetry, docs)
    group = f"{env.prefix}-sink"
    # small, frequent blocks: the kill lands between inserts and commits
    first = sinks(env, tmp_path / "chdb", group, SLUICE_SINK_BATCH_MAX_ROWS="100", SLUICE_SINK_BATCH_MAX_S="0.05")
    deadline = time.monotonic() + 30
    stored = 0
    while time.monotonic() < deadline:
        stored = first.counts()[0]
        if stored > 0:
            break
        await asyncio.sleep(0.01)
    first.kill()
    assert 0 < stored < N, f"{stored} rows at the kill"
    # the restart cuts its blocks differently (large ones), yet stores each row once
    second = sinks(env, tmp_path / "chdb", group, SLUICE_SINK_BATCH_MAX_ROWS="5000")
    rows, ids = await asyncio.to_thread(second.wait_rows, N)
    assert (rows, ids) == (N, N), second.log()
    _, minute = second.query("SELECT sum(requests) FROM sluice.telemetry_minute")
    assert minute[0][0] == N


class CrashAfterInsert:
    """A real chDB store whose process 'dies' right after its first insert
    succeeded: the insert is stored, the commit that should follow never runs."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.database = inner.database

    def start(self) -> None:
        self.inner.start()

    def insert(self, rows, dedup_token: str, table: str = "telemetry") -> None:
        self.inner.insert(rows, dedup_token, table)
        raise KeyboardInterrupt(f"crash after storing {dedup_token}")

    def query(self, sql: str):
        return self.inner.query(sql)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.timeout(150)
async def test_a_crash_between_insert_and_commit_is_replayed_as_the_same_block(env, tmp_path):
    """The crash window itself, made certain: the first run stores a block of
    100 and dies before committing; the second run reads bigger batches, yet
    its first block is cut where the planned cut says, and ClickHouse drops it."""
    from sinks.config import SinkConfig
    from sinks.sink import TelemetrySink
    from sinks.store import ChdbStore

    base = now_ms() - 60_000
    await produce(env.stack.bootstrap_servers, env.topics.telemetry, [telemetry(i, base) for i in range(N)])
    group = f"{env.prefix}-sink"
    cfg = SinkConfig(
        bootstrap_servers=env.stack.bootstrap_servers,
        topic_prefix=env.prefix,
        sink_group_id=group,
        chdb_path=tmp_path / "chdb",
        sink_port=0,
        sink_batch_max_rows=100,
        sink_batch_max_s=0.05,
    )
    first = TelemetrySink(cfg, store=CrashAfterInsert(ChdbStore(cfg.chdb_path, "sluice")))
    # the stores are closed whatever happens: chDB holds one folder per
    # process, and a test that left its folder open would fail every later one
    try:
        await first.start()
        # a bound without a task of its own: asyncio lets a KeyboardInterrupt
        # out of a task into the event loop itself
        with pytest.raises(KeyboardInterrupt):
            async with asyncio.timeout(45):
                await first.run()
        await check_replayed(env, cfg, group)
    finally:
        first.store.close()


async def check_replayed(env, cfg, group: str) -> None:
    """The crashed run's planned cut is committed; a second sink stores every record once."""
    from aiokafka.admin import AIOKafkaAdminClient

    from sinks.sink import CUT_PREFIX, TelemetrySink

    admin = AIOKafkaAdminClient(bootstrap_servers=env.stack.bootstrap_servers)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    cuts = {tp.partition: om for tp, om in committed.items() if om.metadata.startswith(CUT_PREFIX)}
    assert cuts, f"no planned cut was committed: {committed}"

    second = TelemetrySink(cfg.model_copy(update={"sink_batch_max_rows": 5000, "sink_batch_max_s": 0.5}))
    await second.start()
    running = asyncio.create_task(second.run())
    try:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            _, rows = await asyncio.to_thread(second.store.query, "SELECT count() FROM sluice.telemetry")
            if rows[0][0] >= N:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        _, rows = await asyncio.to_thread(second.store.query, "SELECT count(), uniqExact(id) FROM sluice.telemetry")
        _, minute = await asyncio.to_thread(second.store.query, "SELECT sum(requests) FROM sluice.telemetry_minute")
        assert rows[0] == (N, N)
        assert minute[0][0] == N
    finally:
        second.stop()
        try:
            await asyncio.wait_for(running, 30)
        finally:
            second.store.close()


@pytest.mark.timeout(180)
async def test_requests_through_the_pipeline_land_once_and_queries_match_python(
    env, worker_factory, client, sinks, tmp_path
):
    """End to end: client -> worker -> telemetry -> sink -> SQL, checked
    against the same figures computed from the telemetry records."""
    from collections import Counter

    from producers.corpus import text
    from sinks.analytics import run
    from tests.conftest import read_topic

    worker_factory()
    sink = sinks(env, tmp_path / "chdb", f"{env.prefix}-sink")
    texts = [text(i % 120, seed=50) for i in range(400)]  # repeats: hits and misses
    tenants = ["acme", "beta"]
    results = []
    for tenant in tenants:
        results += await client.submit_many(texts[:200] if tenant == "acme" else texts[200:], tenant=tenant)
    assert all(r.status == "ok" for r in results)
    n = len(results)
    assert sink.wait_rows(n, timeout_s=60) == (n, n)
    _, ids = sink.query("SELECT id FROM sluice.telemetry")
    assert sorted(i for [i] in ids) == sorted(r.id for r in results)

    records = [
        Telemetry.model_validate(orjson.loads(r.value))
        for r in await read_topic(env.stack.bootstrap_servers, env.topics.telemetry, expect=n)
    ]

    def rows(name):
        cols, out = run(name, sink.query, since_s=3600)
        return [dict(zip(cols, r)) for r in out]

    per_tenant = {g["tenant"]: g for g in rows("cost_by_tenant_day")}
    for tenant in tenants:
        mine = [t for t in records if t.tenant == tenant]
        assert per_tenant[tenant]["requests"] == len(mine)
        assert per_tenant[tenant]["cost_usd"] == pytest.approx(sum(t.cost_usd for t in mine), rel=1e-6)
    [hit] = rows("cache_hit_rate")
    levels = Counter(t.cache for t in records)
    assert (hit["l1"], hit["l2"], hit["coalesced"], hit["misses"]) == (
        levels["l1"],
        levels["l2"],
        levels["coalesced"],
        levels["miss"],
    )
    assert levels["l1"] + levels["coalesced"] > 0 and levels["miss"] > 0
    [w] = rows("worker_throughput")
    assert w["requests"] == n and w["computed"] == levels["miss"]
    assert w["compute_s"] == pytest.approx(sum(t.compute_ms for t in records) / 1000, abs=2e-3)
