"""Load generator and checker for the faust evaluation (runs in the project venv: confluent_kafka).

python tools.py topics RUN                      create fe.{requests,admitted,results}.RUN, 6 partitions
python tools.py produce RUN --n 20000 --tenants 50 [--rate 500] [--start 0]
python tools.py check RUN --expect 20000 [--timeout 120] [--idle 10] [--isolation read_committed]
    consumes fe.admitted.RUN + fe.results.RUN from the beginning and prints one JSON line:
    records, unique ids, duplicate ids, missing ids (of 0..expect-1), per-tenant seq
    gaps/repeats, admitted/rejected, throughput from the worker's t_admit stamps,
    and latency (arrival here - request ts) p50/p99 -- meaningful when the checker runs
    while the load is produced.
"""

import argparse
import json
import sys
import time
from collections import Counter, defaultdict

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

BOOT = "127.0.0.1:39092"


def names(run):
    s = f".{run}" if run else ""
    return f"fe.requests{s}", f"fe.admitted{s}", f"fe.results{s}"


def cmd_topics(a):
    adm = AdminClient({"bootstrap.servers": BOOT})
    fs = adm.create_topics([NewTopic(t, 6, 1) for t in names(a.run)])
    for t, f in fs.items():
        try:
            f.result()
            print("created", t)
        except Exception as e:
            print(t, e)


def cmd_produce(a):
    req = names(a.run)[0]
    p = Producer({"bootstrap.servers": BOOT, "linger.ms": 5, "enable.idempotence": True})
    t0 = time.time()
    for i in range(a.n):
        if a.rate:
            due = t0 + i / a.rate
            d = due - time.time()
            if d > 0:
                time.sleep(d)
        rid = a.start + i
        tenant = f"t{rid % a.tenants}" if not a.tenant else a.tenant
        v = {"id": rid, "tenant": tenant, "input": "hello world", "ts": time.time()}
        while True:
            try:
                p.produce(req, key=tenant, value=json.dumps(v))
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    p.flush(30)
    dt = time.time() - t0
    print(json.dumps({"produced": a.n, "seconds": round(dt, 2), "rate": round(a.n / dt)}))


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def cmd_check(a):
    _, adm_t, res_t = names(a.run)
    c = Consumer(
        {
            "bootstrap.servers": BOOT,
            "group.id": f"fe-check-{time.time()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": a.isolation,
        }
    )
    c.subscribe([adm_t, res_t])
    ids = Counter()
    seqs = defaultdict(list)
    lat, tadm = [], []
    n_adm = n_rej = 0
    pids = Counter()
    t_start = time.time()
    last = time.time()
    done_at = None
    while True:
        m = c.poll(0.2)
        now = time.time()
        if m is None or m.error():
            if done_at is None and len(ids) >= a.expect and now - last > a.idle:
                break
            if now - last > a.idle and len(ids) >= a.expect:
                break
            if now - t_start > a.timeout:
                break
            continue
        last = now
        v = json.loads(m.value())
        ids[v["id"]] += 1
        seqs[v["tenant"]].append(v["seq"])
        pids[v.get("pid")] += 1
        if v.get("ts"):
            lat.append(now - v["ts"])
        tadm.append(v["t_admit"])
        if m.topic() == adm_t:
            n_adm += 1
        else:
            n_rej += 1
        if len(ids) >= a.expect and done_at is None:
            done_at = now
    c.close()
    dup = sum(1 for k, n in ids.items() if n > 1)
    missing = [i for i in range(a.start, a.start + a.expect) if i not in ids]
    gaps = repeats = 0
    for s in seqs.values():
        cnt = Counter(s)
        repeats += sum(n - 1 for n in cnt.values() if n > 1)
        mx = max(s)
        gaps += sum(1 for k in range(1, mx + 1) if k not in cnt)
    out = {
        "run": a.run,
        "isolation": a.isolation,
        "records": sum(ids.values()),
        "unique_ids": len(ids),
        "dup_ids": dup,
        "missing_ids": len(missing),
        "missing_sample": missing[:5],
        "admitted": n_adm,
        "rejected": n_rej,
        "tenants": len(seqs),
        "seq_gaps": gaps,
        "seq_repeats": repeats,
        "max_seq": {t: max(s) for t, s in sorted(seqs.items())[:3]},
        "worker_pids": dict(pids),
    }
    if tadm:
        span = max(tadm) - min(tadm)
        out["worker_span_s"] = round(span, 2)
        out["worker_rate"] = round(len(tadm) / span) if span > 0 else None
    if lat:
        out["lat_p50_ms"] = round(pct(lat, 0.5) * 1000, 1)
        out["lat_p99_ms"] = round(pct(lat, 0.99) * 1000, 1)
        out["lat_max_ms"] = round(max(lat) * 1000, 1)
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    sp = ap.add_subparsers(dest="cmd", required=True)
    p = sp.add_parser("topics")
    p.add_argument("run")
    p = sp.add_parser("produce")
    p.add_argument("run")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--tenants", type=int, default=50)
    p.add_argument("--tenant", default="")
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--start", type=int, default=0)
    p = sp.add_parser("check")
    p.add_argument("run")
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--idle", type=float, default=8)
    p.add_argument("--isolation", default="read_committed")
    a = ap.parse_args()
    {"topics": cmd_topics, "produce": cmd_produce, "check": cmd_check}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
