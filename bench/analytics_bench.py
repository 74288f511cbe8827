"""Analytics benchmark: sink insert throughput into embedded chDB, and the
time of each named query over 10 million synthetic telemetry rows.

    .venv/bin/python -m bench.analytics_bench [--rows 10000000]

Writes bench/out/analytics.md (and prints it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from bench.harness import OUT, machine
from sinks.analytics import load_queries
from sinks.config import SinkConfig
from sinks.rows import to_row
from sinks.store import open_store


def telemetry(i: int, now_ms: int, rng: np.random.Generator) -> bytes:
    t = now_ms - int(rng.integers(0, 3_600_000))
    cache = ("l1", "l2", "coalesced", "miss")[int(rng.integers(0, 4))]
    return orjson.dumps(
        {
            "v": 1,
            "id": f"b{i}",
            "tenant": f"t{i % 7}",
            "model": "all-minilm-l6-v2",
            "model_version": "int8-1",
            "task": "embed",
            "status": "ok",
            "error_code": "",
            "cache": cache,
            "tokens": 15,
            "batch_size": 32,
            "worker": f"w{i % 3}",
            "partition": i % 12,
            "offset": i,
            "sent_at_ms": t - 20,
            "received_at_ms": t - 15,
            "inference_start_ms": t - 10,
            "inference_end_ms": t - 5,
            "published_at_ms": t,
            "queue_ms": 5.0,
            "cache_ms": 0.1,
            "inference_ms": 5.0,
            "total_ms": 20.0,
            "compute_ms": 1.5,
            "cost_usd": 4e-8,
        }
    )


def sink_throughput(store, n: int, batch: int) -> float:
    """Records off the wire -> rows -> chDB inserts, as the sink does them."""
    rng = np.random.default_rng(1)
    now = int(time.time() * 1000)
    records = [telemetry(i, now, rng) for i in range(n)]
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        rows = [to_row(r) for r in records[start : start + batch]]
        store.insert(rows, dedup_token=f"bench:0:{start}-{start + len(rows) - 1}")
    return n / (time.perf_counter() - t0)


def synthesise(store, rows: int, db: str) -> float:
    """rows synthetic telemetry rows over the last 24 hours, generated inside ClickHouse."""
    t0 = time.perf_counter()
    step = 1_000_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        store.execute(f"""
            INSERT INTO {db}.telemetry
            SELECT
                concat('s', toString(number)) AS id,
                concat('tenant-', toString(number % 50)) AS tenant,
                ['all-minilm-l6-v2', 'all-minilm-l6-v2-sq8', 'bge-small'][1 + number % 3] AS model,
                'v1' AS model_version,
                if(number % 5 = 0, 'classify', 'embed') AS task,
                multiIf(number % 50 = 0, 'error', number % 97 = 0, 'expired', 'ok') AS status,
                if(number % 50 = 0, 'model_error', '') AS error_code,
                ['l1', 'l1', 'l1', 'l2', 'coalesced', 'miss'][1 + number % 6] AS cache,
                5 + number % 60 AS tokens, 1 + number % 64 AS batch_size,
                concat('worker-', toString(number % 8)) AS worker,
                number % 12 AS partition, number AS offset,
                now64(3) - toIntervalMillisecond(rand(1) % 86400000) AS published_at,
                published_at - toIntervalMillisecond(20) AS sent_at,
                published_at - toIntervalMillisecond(15) AS received_at,
                published_at - toIntervalMillisecond(10) AS inference_start,
                published_at - toIntervalMillisecond(5) AS inference_end,
                5 AS queue_ms, 0.1 AS cache_ms, 5 AS inference_ms,
                (rand(2) % 100000) / 100 AS total_ms,
                if(number % 6 = 5, 1.5, 0) AS compute_ms,
                if(number % 6 = 5, 4e-8, 1e-11) AS cost_usd
            FROM numbers({start}, {n})
            SETTINGS insert_deduplication_token = 'synth-{start}'""")
        print(f"  synthesised {start + n:,} rows ({time.perf_counter() - t0:.1f} s)", flush=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--sink-records", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=50_000)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SinkConfig(chdb_path=Path(tmp) / "chdb")
        store = open_store(cfg)
        store.start()
        print(f"== sink path: {args.sink_records:,} records in batches of {args.batch:,}", flush=True)
        rps = sink_throughput(store, args.sink_records, args.batch)
        print(f"  {rps:,.0f} records/s", flush=True)
        print(f"== {args.rows:,} synthetic rows", flush=True)
        synth_s = synthesise(store, args.rows, cfg.clickhouse_database)
        [[count]] = store.query(f"SELECT count() FROM {cfg.clickhouse_database}.telemetry")[1]
        rows = []
        for name, q in load_queries().items():
            sql = q.render(db=cfg.clickhouse_database, since_s=86400, slo_ms=500)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                _, out = store.query(sql)
                times.append(time.perf_counter() - t0)
            rows.append((name, statistics.median(times), max(times), len(out)))
            print(f"  {name}: median {statistics.median(times) * 1000:.0f} ms ({len(out)} rows)", flush=True)
        store.close()
    md = [
        f"Machine: {machine()}",
        "",
        f"Sink path (record bytes -> row -> chDB insert, batches of {args.batch:,}): "
        f"**{rps:,.0f} records/s** (target: keep up with 20,000/s: {'pass' if rps >= 20000 else 'FAIL'}).",
        "",
        f"{count:,} rows in `telemetry` (synthesised in ClickHouse in {synth_s:.0f} s; the "
        "materialized view rolled them up per minute as they went in). Each named query over "
        "the last 24 hours (`--since 1d`), 3 runs:",
        "",
        "| query | median ms | max ms | rows out | under 1 s |",
        "|---|---|---|---|---|",
    ]
    for name, med, mx, n in rows:
        md.append(f"| {name} | {med * 1000:.0f} | {mx * 1000:.0f} | {n} | {'pass' if mx < 1 else 'FAIL'} |")
    text = "\n".join(md)
    (OUT / "analytics.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
