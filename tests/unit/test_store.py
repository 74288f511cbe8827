"""The store on real chDB (a tmp folder) and, when SLUICE_TEST_CLICKHOUSE_URL
names one, on a real ClickHouse server through clickhouse-connect: the same
tests, the same DDL, the same SQL."""

from __future__ import annotations

import os
import time
import uuid

import orjson
import pytest

from schemas.records import Telemetry
from sinks.errors import QueryError
from sinks.rows import BadRecord, to_row
from sinks.store import ChdbStore, ServerStore

SERVER_URL = os.environ.get("SLUICE_TEST_CLICKHOUSE_URL", "")
# recent, so the table's TTL keeps them (expired rows are dropped at insert)
BASE_MS = (int(time.time()) - 3600) * 1000 + 4


def telemetry(i: int, *, ms: int = BASE_MS, check: bool = True, **over) -> dict:
    doc = {
        "v": 1,
        "id": f"req-{i}",
        "tenant": f"tenant-{i % 3}",
        "model": ["mini", "base"][i % 2],
        "model_version": "1",
        "task": "embed",
        "status": ["ok", "ok", "error", "expired"][i % 4],
        "error_code": "",
        "cache": ["l1", "l2", "miss", "coalesced", "none"][i % 5],
        "tokens": 10 + i % 7,
        "batch_size": 4,
        "worker": f"w{i % 2}",
        "partition": i % 6,
        "offset": i,
        "sent_at_ms": ms + i,
        "received_at_ms": ms + i + 1,
        "inference_start_ms": ms + i + 2,
        "inference_end_ms": ms + i + 3,
        "published_at_ms": ms + i + 5,
        "queue_ms": 1.0,
        "cache_ms": 0.25,
        "inference_ms": 1.0,
        "total_ms": float(5 + i % 50),
        "cost_usd": 1e-6 * (i % 10),
    }
    doc.update(over)
    if check:
        Telemetry.model_validate(doc)  # the fixtures are valid records
    return doc


def rows(n: int, start: int = 0) -> list[bytes]:
    return [to_row(orjson.dumps(telemetry(i))) for i in range(start, start + n)]


@pytest.fixture(params=["chdb", "server"])
def store(request, tmp_path):
    if request.param == "chdb":
        s = ChdbStore(tmp_path / "chdb", database="sluice_test", ttl_days=30)
    else:
        if not SERVER_URL:
            pytest.skip(
                "clickhouse-connect back end: no ClickHouse server here; set "
                "SLUICE_TEST_CLICKHOUSE_URL=http://user:pass@host:8123/ to run these tests on one"
            )
        s = ServerStore(SERVER_URL, database=f"sluice_test_{uuid.uuid4().hex[:8]}", ttl_days=30)
    s.start()
    yield s
    if request.param == "server":
        try:
            s._client.command(f"DROP DATABASE IF EXISTS {s.database}")  # type: ignore[attr-defined]
        except Exception:
            pass
    s.close()


def count(store, table: str = "telemetry") -> int:
    return store.query(f"SELECT count() FROM {store.database}.{table}")[1][0][0]


def rollup_requests(store) -> int:
    return store.query(f"SELECT sum(requests) FROM {store.database}.telemetry_minute")[1][0][0]


def test_ddl_is_idempotent(store):
    store.start()
    store.start()
    _, tables = store.query(f"SELECT name FROM system.tables WHERE database = '{store.database}' ORDER BY name")
    assert sorted(t[0] for t in tables) == [
        "autoscale_events",
        "latency_minute",
        "latency_minute_mv",
        "telemetry",
        "telemetry_minute",
        "telemetry_minute_mv",
    ]


def test_same_token_twice_is_stored_once_in_table_and_rollup(store):
    block = rows(100)
    store.insert(block, "t:0:0-99")
    store.insert(block, "t:0:0-99")  # a replay
    assert count(store) == 100
    assert rollup_requests(store) == 100
    store.insert(rows(50, 100), "t:0:100-149")  # a new block is stored
    assert count(store) == 150
    assert rollup_requests(store) == 150
    _, r = store.query(f"SELECT uniqExact(id) FROM {store.database}.telemetry")
    assert r == [(150,)]


def test_dict_rows_are_accepted(store):
    doc = orjson.loads(to_row(orjson.dumps(telemetry(7))))
    store.insert([doc], "dicts")
    assert count(store) == 1


def test_timestamps_round_trip_to_the_millisecond(store):
    # ms values that are not exact in binary floating point, and zero
    docs = [
        telemetry(0, ms=BASE_MS),
        telemetry(1, ms=BASE_MS - 4 + 999),
        telemetry(2, ms=0, published_at_ms=BASE_MS - 3),
    ]
    store.insert([to_row(orjson.dumps(d)) for d in docs], "ts")
    cols, got = store.query(
        "SELECT id, toUnixTimestamp64Milli(sent_at), toUnixTimestamp64Milli(received_at), "
        "toUnixTimestamp64Milli(inference_start), toUnixTimestamp64Milli(inference_end), "
        f"toUnixTimestamp64Milli(published_at) FROM {store.database}.telemetry ORDER BY id"
    )
    assert len(cols) == 6
    want = [
        (
            d["id"],
            d["sent_at_ms"],
            d["received_at_ms"],
            d["inference_start_ms"],
            d["inference_end_ms"],
            d["published_at_ms"],
        )
        for d in docs
    ]
    assert got == want


def test_query_returns_names_and_typed_rows(store):
    store.insert(rows(20), "q")
    cols, got = store.query(
        f"SELECT tenant, count() AS n, sum(tokens) AS tokens, round(sum(cost_usd), 9) AS cost "
        f"FROM {store.database}.telemetry GROUP BY tenant ORDER BY tenant"
    )
    assert cols == ["tenant", "n", "tokens", "cost"]
    docs = [telemetry(i) for i in range(20)]
    want = []
    for t in sorted({d["tenant"] for d in docs}):
        mine = [d for d in docs if d["tenant"] == t]
        want.append((t, len(mine), sum(d["tokens"] for d in mine), round(sum(d["cost_usd"] for d in mine), 9)))
    assert got == want
    assert all(isinstance(r[1], int) for r in got)  # UInt64 as numbers, not strings


def test_rollup_quantiles_match_the_raw_rows(store):
    store.insert(rows(200), "quant")
    _, raw = store.query(f"SELECT quantilesExact(0.5)(total_ms)[1], count() FROM {store.database}.telemetry")
    _, roll = store.query(f"SELECT sum(requests) FROM {store.database}.telemetry_minute")
    assert roll[0][0] == raw[0][1] == 200


def test_query_errors_are_query_errors(store):
    with pytest.raises(QueryError):
        store.query("SELECT no_such_column FROM system.one")


# What a user may send to POST /query or `sluice analytics`; each must be refused
# by ClickHouse's parser, our check of its AST, or readonly = 1.
ATTACKS = {
    "file table function": "SELECT * FROM file('{secret}', 'LineAsString')",
    "file scalar": "SELECT file('{secret}')",
    "file, upper case": "SELECT FILE('{secret}')",
    "file in a subquery": "SELECT * FROM (SELECT * FROM file('{secret}', 'LineAsString'))",
    "file after a first statement": "SELECT 1; SELECT file('{secret}')",
    "url": "SELECT * FROM url('http://127.0.0.1:9/x', 'LineAsString')",
    "remote": "SELECT * FROM remote('127.0.0.1:9000', system.one)",
    "s3": "SELECT * FROM s3('http://127.0.0.1:9/b/x.csv')",
    "into outfile": "SELECT 'pwned' INTO OUTFILE '{out}'",
    "into outfile after a comment": "/* x */ SELECT 'pwned' INTO OUTFILE '{out}' -- y",
    "format": "SELECT 1 FORMAT CSV",
    "settings raising the budget": "SELECT count() FROM numbers(10) SETTINGS max_execution_time = 3600",
    "settings inside": "SELECT * FROM (SELECT 1 SETTINGS readonly = 0)",
    "drop": "DROP TABLE {db}.telemetry",
    "insert": "INSERT INTO {db}.telemetry (id) VALUES ('x')",
    "alter": "ALTER TABLE {db}.telemetry DELETE WHERE 1",
    "system": "SYSTEM FLUSH LOGS",
    "set": "SET readonly = 0",
    "ai provider": "SELECT aiEmbed('text')",
    "empty": "  ",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_query_that_could_touch_files_network_or_data_is_refused(store, tmp_path, attack):
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-leak-7f3a\n")
    out = tmp_path / "written.txt"
    store.insert(rows(3), "before")
    sql = ATTACKS[attack].format(secret=secret, out=out, db=store.database)
    with pytest.raises(QueryError) as exc:
        store.query(sql)
    assert "do-not-leak" not in str(exc.value)
    assert not out.exists()
    assert count(store) == 3  # nothing dropped, inserted or deleted


# about 1 s of one core per million rows on this machine kind
HEAVY_SCAN = "SELECT count() FROM numbers({rows}) WHERE NOT ignore(arrayMap(x -> sipHash64(x, number), range(100)))"


def test_every_named_query_passes_the_guard(store):
    from sinks.analytics import load_queries, run

    store.insert(rows(50), "named")
    for name in load_queries():
        cols, _ = run(name, store.query, db=store.database, since_s=7 * 86400)
        assert cols, name
    # plain analytics SQL a user writes: comments, WITH, a trailing `;`, system tables
    assert store.query("-- mine\nWITH x AS (SELECT 2 AS a) SELECT a FROM x;") == (["a"], [(2,)])
    assert store.query("SELECT ';' AS semicolon") == (["semicolon"], [(";",)])
    assert store.query(f"SELECT count() FROM system.tables WHERE database = '{store.database}'")[1][0][0] >= 2


def test_the_budget_stops_a_query_and_the_next_answer_is_clean(tmp_path):
    from sinks.query_guard import QueryBudget

    store = ChdbStore(
        tmp_path / "chdb",
        database="sluice_test",
        readers=1,
        budget=QueryBudget(max_result_rows=1000, max_rows_to_read=5_000_000, max_execution_s=1.0),
    )
    store.start()
    try:
        for sql, why in [
            ("SELECT number FROM numbers(5000)", "TOO_MANY_ROWS"),
            ("SELECT count() FROM numbers(100000000)", "max_rows_to_read"),
            (HEAVY_SCAN.format(rows=4_000_000), "TIMEOUT_EXCEEDED"),
        ]:
            with pytest.raises(QueryError, match=why):
                store.query(sql)
            # the only connection failed mid-stream; the next answer has no leftovers of it
            assert store.query("SELECT 7 AS x") == (["x"], [(7,)])
    finally:
        store.close()


def test_our_own_sql_keeps_full_rights(store):
    store.execute(f"CREATE TABLE {store.database}.own (x UInt8) ENGINE = MergeTree ORDER BY x")
    store.execute(f"INSERT INTO {store.database}.own VALUES (1), (2)")
    assert store.query(f"SELECT sum(x) FROM {store.database}.own")[1] == [(3,)]


def test_bad_records_are_refused():
    for raw in [
        None,
        b"not json",
        b"{}",
        orjson.dumps(telemetry(1, tokens=-1)),
        orjson.dumps(telemetry(1, status="weird", check=False)),
        orjson.dumps(telemetry(1, sent_at_ms=-5)),
    ]:
        with pytest.raises(BadRecord):
            to_row(raw)


def test_a_second_process_cannot_open_the_folder(tmp_path):
    import subprocess
    import sys

    s = ChdbStore(tmp_path / "locked", database="sluice_test")
    s.start()
    try:
        code = (
            "import sys; from sinks.store import ChdbStore, SinkError\n"
            f"s = ChdbStore({str(tmp_path / 'locked')!r})\n"
            "try:\n    s.start()\nexcept SinkError as e:\n    print(e); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 3, out.stdout + out.stderr
        assert "another sink" in out.stdout
    finally:
        s.close()


def test_a_50k_row_block_is_stored_whole(tmp_path):
    """The sink's default batch in one block (its speed is measured by bench/analytics_bench.py)."""
    s = ChdbStore(tmp_path / "big", database="sluice_test")
    s.start()
    try:
        block = rows(50_000)
        t0 = time.perf_counter()
        s.insert(block, "big")
        dt = time.perf_counter() - t0
        print(f"\nchDB insert: 50000 rows in {dt:.3f} s = {50_000 / dt:,.0f} rows/s")
        assert count(s) == 50_000
    finally:
        s.close()
