"""Minimal faust-streaming admission-control stage (evaluation for issue 16).

Runs in its own venv (/tmp/faust-venv): faust-streaming cannot share the project venv
(click<8.4 vs the project's click>=8.4.2/8.5 pins; see README.md).

  FE_RUN=eos FE_GUARANTEE=exactly_once /tmp/faust-venv/bin/python admission_app.py worker -l info --web-port 6066

Consumes JSON {"id","tenant","input","ts"} from fe.requests[.RUN] (6 partitions, key = tenant),
keeps a per-tenant fixed-window counter in a changelog-backed Table, and sends
admitted requests to fe.admitted[.RUN], rejections ({"status":"rejected"}) to fe.results[.RUN].
Every output carries the tenant's sequence number from the table ("seq"): if the table
survives restarts/rebalances the seqs of a tenant are exactly 1..n with no gap or repeat.
"""

import os
import time

import faust

RUN = os.environ.get("FE_RUN", "")
SFX = f".{RUN}" if RUN else ""
BROKER = os.environ.get("FE_BROKER", "kafka://127.0.0.1:39092")
GUARANTEE = os.environ.get("FE_GUARANTEE", "exactly_once")  # or at_least_once
LIMIT = int(os.environ.get("FE_LIMIT", "1000000"))  # admitted requests per tenant per window
WINDOW_S = float(os.environ.get("FE_WINDOW_S", "60"))
STORE = os.environ.get("FE_STORE", "memory://")  # rocksdb:// needs faust-streaming[rocksdb]

extra = {}
if os.environ.get("FE_COMMIT_INTERVAL"):
    extra["broker_commit_interval"] = float(os.environ["FE_COMMIT_INTERVAL"])
if os.environ.get("FE_SESSION_TIMEOUT"):
    extra["broker_session_timeout"] = float(os.environ["FE_SESSION_TIMEOUT"])
    extra["broker_heartbeat_interval"] = max(1.0, float(os.environ["FE_SESSION_TIMEOUT"]) / 10)

DATADIR = os.environ.get("FE_DATADIR", f"/tmp/fe-data/{RUN or 'default'}-{os.getpid()}")
os.makedirs(DATADIR, exist_ok=True)

app = faust.App(
    os.environ.get("FE_APP_ID", f"fe-admission{SFX}"),
    broker=BROKER,
    store=STORE,
    processing_guarantee=GUARANTEE,
    topic_partitions=6,
    datadir=DATADIR,
    **extra,
)

requests = app.topic(f"fe.requests{SFX}", key_type=str, key_serializer="raw", value_serializer="json", partitions=6)
admitted = app.topic(f"fe.admitted{SFX}", key_type=str, key_serializer="raw", value_serializer="json", partitions=6)
results = app.topic(f"fe.results{SFX}", key_type=str, key_serializer="raw", value_serializer="json", partitions=6)

# per tenant: {"w": window start, "n": admitted in window, "seq": requests seen in total}
state = app.Table("tenant_state", default=dict, partitions=6, key_type=str)


@app.agent(requests)
async def admit(stream):
    async for tenant, req in stream.items():
        if isinstance(tenant, bytes):
            tenant = tenant.decode()
        now = time.time()
        st = dict(state[tenant]) or {"w": 0.0, "n": 0, "seq": 0}
        w = now - (now % WINDOW_S)
        if st["w"] != w:
            st["w"], st["n"] = w, 0
        st["seq"] += 1
        ok = st["n"] < LIMIT
        if ok:
            st["n"] += 1
        state[tenant] = st
        out = {
            "id": req["id"],
            "tenant": tenant,
            "seq": st["seq"],
            "ts": req.get("ts"),
            "t_admit": now,
            "pid": os.getpid(),
        }
        if ok:
            await admitted.send(key=tenant, value=out)
        else:
            out["status"] = "rejected"
            await results.send(key=tenant, value=out)


if __name__ == "__main__":
    app.main()
