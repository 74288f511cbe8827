"""Each named query against the real ClickHouse engine (embedded chDB), its
answer checked against the same figure computed in Python from the rows."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter, defaultdict

import numpy as np
import orjson
import pytest

from sinks.analytics import AnalyticsError, format_result, load_queries, parse_since, run
from sinks.config import SinkConfig
from sinks.sink import to_row
from sinks.store import open_store

N = 3000


def make_rows(now_s: float) -> list[dict]:
    rng = np.random.default_rng(3)
    rows = []
    for i in range(N):
        minute_back = int(rng.integers(1, 30))
        published = now_s - minute_back * 60 - float(rng.uniform(0, 50))
        slow = minute_back == 7  # one minute that breaks any sane SLO
        total = float(rng.uniform(1500, 2500)) if slow else float(rng.uniform(5, 120))
        cache = str(rng.choice(["l1", "l2", "coalesced", "miss"], p=[0.6, 0.1, 0.1, 0.2]))
        computed = cache == "miss"
        rows.append(
            {
                "v": 1,
                "id": f"r{i}",
                "tenant": str(rng.choice(["acme", "beta", "corp"])),
                "model": str(rng.choice(["m-a", "m-b"])),
                "model_version": "1",
                "task": "embed",
                "status": str(rng.choice(["ok", "error", "expired"], p=[0.9, 0.07, 0.03])),
                "error_code": "",
                "cache": cache,
                "tokens": int(rng.integers(3, 60)) if computed else 0,
                "batch_size": 8,
                "worker": str(rng.choice(["w1", "w2"])),
                "partition": i % 12,
                "offset": i,
                "sent_at_ms": int((published - total / 1000) * 1000),
                "received_at_ms": int(published * 1000) - 5,
                "inference_start_ms": int(published * 1000) - 4,
                "inference_end_ms": int(published * 1000) - 2,
                "published_at_ms": int(published * 1000),
                "queue_ms": 1.0,
                "cache_ms": 0.1,
                "inference_ms": 2.0 if computed else 0.0,
                "total_ms": total,
                "compute_ms": float(rng.uniform(1, 5)) if computed else 0.0,
                "cost_usd": float(rng.uniform(1e-7, 1e-6)) if computed else 1e-10,
            }
        )
    return rows


SERVER_URL = os.environ.get("SLUICE_TEST_CLICKHOUSE_URL", "")


@pytest.fixture(scope="module", params=["chdb", "server"])
def store_and_rows(request, tmp_path_factory):
    """The same queries on both back ends: embedded chDB, and a ClickHouse
    server when SLUICE_TEST_CLICKHOUSE_URL names one."""
    if request.param == "chdb":
        cfg = SinkConfig(chdb_path=tmp_path_factory.mktemp("chdb"))
    else:
        if not SERVER_URL:
            pytest.skip(
                "clickhouse-connect back end: no ClickHouse server here; set "
                "SLUICE_TEST_CLICKHOUSE_URL=http://user:pass@host:8123/ to run these tests on one"
            )
        cfg = SinkConfig(clickhouse_url=SERVER_URL, clickhouse_database=f"sluice_q_{uuid.uuid4().hex[:8]}")
    store = open_store(cfg)
    store.start()
    rows = make_rows(time.time())
    store.insert([to_row(orjson.dumps(r)) for r in rows], dedup_token="test:0:0-2999")
    store.db = cfg.clickhouse_database
    yield store, rows
    store.close()


def q(store, name, **kw):
    cols, rows = run(name, store.query, db=store.db, since_s=kw.pop("since_s", 3600), **kw)
    return [dict(zip(cols, r)) for r in rows]


def minute_of(row) -> int:
    return row["published_at_ms"] // 60000


def minute_key(value) -> int:
    """A minute column (datetime or 'YYYY-MM-DD hh:mm:ss' in UTC) -> minutes since the epoch."""
    import calendar

    if isinstance(value, str):
        return calendar.timegm(time.strptime(value, "%Y-%m-%d %H:%M:%S")) // 60
    return int(value.timestamp()) // 60


def test_every_query_file_says_what_it_answers():
    queries = load_queries()
    assert set(queries) == {
        "latency_by_model_minute",
        "cost_by_tenant_day",
        "cache_hit_rate",
        "worker_throughput",
        "slo_violations",
        "autoscale_signal",
        "autoscale_events",
        "rejections",
        "traffic_by_minute",
    }
    assert all(qq.answers for qq in queries.values())


def test_latency_by_model_minute(store_and_rows):
    store, rows = store_and_rows
    got = q(store, "latency_by_model_minute")
    groups = defaultdict(list)
    for r in rows:
        groups[(minute_of(r), r["model"])].append(r["total_ms"])
    assert len(got) == len(groups)
    for g in got:
        key = (minute_key(g["minute"]), g["model"])
        vals = np.array(groups[key])
        assert g["requests"] == len(vals)
        # ClickHouse's quantile interpolates like numpy's default on small sets
        assert g["p50_ms"] == pytest.approx(np.percentile(vals, 50), rel=0.05, abs=1.0)
        assert g["p99_ms"] == pytest.approx(np.percentile(vals, 99), rel=0.05, abs=1.0)


def test_cost_by_tenant_day(store_and_rows):
    store, rows = store_and_rows
    got = q(store, "cost_by_tenant_day")
    want = defaultdict(lambda: [0, 0.0])
    for r in rows:
        day = time.strftime("%Y-%m-%d", time.gmtime(r["published_at_ms"] / 1000))
        want[(day, r["tenant"], r["model"])][0] += 1
        want[(day, r["tenant"], r["model"])][1] += r["cost_usd"]
    assert {(str(g["day"]), g["tenant"], g["model"]): g["requests"] for g in got} == {k: v[0] for k, v in want.items()}
    for g in got:
        n, cost = want[(str(g["day"]), g["tenant"], g["model"])]
        assert g["cost_usd"] == pytest.approx(cost, rel=1e-6)
        assert g["cost_per_request_usd"] == pytest.approx(cost / n, rel=1e-5)


def test_cache_hit_rate_and_cost_saved(store_and_rows):
    store, rows = store_and_rows
    for g in q(store, "cache_hit_rate"):
        mine = [r for r in rows if r["model"] == g["model"]]
        levels = Counter(r["cache"] for r in mine)
        assert (g["l1"], g["l2"], g["coalesced"], g["misses"]) == (
            levels["l1"],
            levels["l2"],
            levels["coalesced"],
            levels["miss"],
        )
        hits = levels["l1"] + levels["l2"] + levels["coalesced"]
        assert g["hit_rate"] == pytest.approx(hits / len(mine), abs=1e-4)
        cost = sum(r["cost_usd"] for r in mine)
        assert g["cost_saved_usd"] == pytest.approx(cost / levels["miss"] * hits, rel=1e-5)


def test_worker_throughput_and_service_rate(store_and_rows):
    store, rows = store_and_rows
    for g in q(store, "worker_throughput"):
        mine = [r for r in rows if r["worker"] == g["worker"]]
        compute_s = sum(r["compute_ms"] for r in mine) / 1000
        assert g["requests"] == len(mine)
        assert g["computed"] == sum(r["cache"] == "miss" for r in mine)
        assert g["compute_s"] == pytest.approx(compute_s, abs=2e-3)
        assert g["service_rate_per_s"] == pytest.approx(len(mine) / compute_s, rel=1e-3)


def test_slo_violations_are_exactly_the_slow_minute(store_and_rows):
    store, rows = store_and_rows
    got = q(store, "slo_violations", slo_ms=500)
    slow = {(minute_of(r), r["model"]) for r in rows if r["total_ms"] > 1000}
    assert {(minute_key(g["minute"]), g["model"]) for g in got} == slow
    assert all(g["p99_ms"] > 500 for g in got)


def test_autoscale_signal(store_and_rows):
    store, rows = store_and_rows
    got = {g["worker"]: g for g in q(store, "autoscale_signal", since_s=3600)}
    assert set(got) == {"w1", "w2"}
    for worker, g in got.items():
        mine = [r for r in rows if r["worker"] == worker]
        compute_s = sum(r["compute_ms"] for r in mine) / 1000
        hits = sum(r["cache"] != "miss" for r in mine)
        assert g["answered"] == len(mine)
        assert g["answered_rps"] == pytest.approx(len(mine) / 3600, abs=1e-3)
        assert g["hit_rate"] == pytest.approx(hits / len(mine), abs=1e-4)
        assert g["model_bound_rps"] == pytest.approx(len(mine) / compute_s, rel=1e-3)
    # the window is in seconds, not minutes: rows older than 5 minutes are out
    recent = [r for r in rows if r["published_at_ms"] >= (time.time() - 300) * 1000]
    assert sum(g["answered"] for g in q(store, "autoscale_signal", since_s=300)) == pytest.approx(len(recent), abs=30)


def test_autoscale_events_lists_the_decisions_in_order(store_and_rows):
    from sinks.rows import decision_row

    store, _ = store_and_rows
    now = int(time.time() * 1000)
    decisions = [
        {"reason": "wake", "current": 0, "desired": 1, "at_ms": now - 20_000, "stuck": []},
        {"reason": "scale_up", "current": 1, "desired": 3, "at_ms": now - 10_000, "stuck": [4]},
        {"reason": "to_zero", "current": 3, "desired": 0, "at_ms": now - 7_200_000, "stuck": []},  # out of window
    ]
    docs = [
        {
            "v": 1,
            "autoscaler": "a1",
            "group": "g",
            "mode": "local",
            "ready": d["current"],
            "recommended": d["desired"],
            "lag": 5000,
            "arrival_rps": 120.5,
            "service_rps": 250.0,
            "service_source": "measured",
            "cold_start_s": 1.5,
            "partitions": 6,
            "missing": [],
            **d,
        }
        for d in decisions
    ]
    store.insert([decision_row(orjson.dumps(d)) for d in docs], "decisions", "autoscale_events")
    got = q(store, "autoscale_events", since_s=3600)
    assert [(g["reason"], g["current"], g["desired"], list(g["stuck"])) for g in got] == [
        ("wake", 0, 1, []),
        ("scale_up", 1, 3, [4]),
    ]
    assert got[0]["arrival_rps"] == 120.5 and got[0]["lag"] == 5000


def test_rejections_count_each_reason_per_tenant_and_minute(tmp_path):
    store = open_store(SinkConfig(chdb_path=tmp_path / "chdb"))
    store.start()
    try:
        base = make_rows(time.time())[:40]
        reasons = ["rate_limited", "budget_exhausted", "overloaded", "kill_switch"]
        for i, r in enumerate(base):
            if i % 2:
                r.update(status="rejected", error_code=reasons[i % 4], tenant=["acme", "beta"][i % 3 == 0])
        store.insert([to_row(orjson.dumps(r)) for r in base], dedup_token="rejections")
        store.db = "sluice"
        got = q(store, "rejections")
        want = Counter((minute_of(r), r["tenant"], r["error_code"]) for r in base if r["status"] == "rejected")
        assert {(minute_key(g["minute"]), g["tenant"], g["reason"]): g["rejected"] for g in got} == dict(want)
    finally:
        store.close()


def test_traffic_by_minute(store_and_rows):
    store, rows = store_and_rows
    got = q(store, "traffic_by_minute")
    per_minute = defaultdict(list)
    for r in rows:
        per_minute[minute_of(r)].append(r)
    assert [minute_key(g["minute"]) for g in got] == sorted(per_minute)
    for g in got:
        mine = per_minute[minute_key(g["minute"])]
        hits = sum(r["cache"] != "miss" for r in mine)
        assert g["requests"] == len(mine)
        assert g["requests_per_s"] == pytest.approx(len(mine) / 60, abs=1e-3)
        assert g["hit_rate"] == pytest.approx(hits / len(mine), abs=1e-4)
        assert g["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in mine), rel=1e-6)


def test_report_is_one_page_with_plots_and_every_table(store_and_rows):
    from sinks.report import build_report

    store, _ = store_and_rows
    page = build_report(store.query, db=store.db, since_s=3600)
    assert page.count("data:image/png;base64,") == 4
    for name in ("cost_by_tenant_day", "cache_hit_rate", "worker_throughput", "slo_violations"):
        assert f"<code>{name}</code>" in page


def test_since_window_excludes_older_rows(store_and_rows):
    store, rows = store_and_rows
    got = q(store, "cost_by_tenant_day", since_s=10 * 60)
    recent = [r for r in rows if r["published_at_ms"] >= (time.time() // 60 * 60 - 600) * 1000]
    assert 0 < sum(g["requests"] for g in got) <= len(recent) + 200 < N


def test_since_and_format_helpers():
    assert parse_since("90s") == 90 and parse_since("15m") == 900 and parse_since("2d") == 172800
    with pytest.raises(AnalyticsError, match="--since"):
        parse_since("yesterday")
    assert format_result(["a"], [(1,)], "csv") == "a\n1"
    assert format_result(["a", "b"], [(1, "x")], "json") == '{"a":1,"b":"x"}'
