"""`sluice admission` on the real stack: a real broker, real workers, the real
tokenizer. Producers write to PREFIX.ingress (keyed by tenant); the stage lets
requests through to PREFIX.requests or answers them `rejected`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from tests.conftest import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def admission(env):
    """Start `sluice admission` on the test's topics; every one is stopped after the test."""
    started: list[WorkerProcess] = []

    def make(**settings: str) -> WorkerProcess:
        stage = WorkerProcess(
            env,
            "admission",
            SLUICE_ADMISSION_GROUP_ID=f"{env.prefix}-admission",
            SLUICE_ADMISSION_LAG_INTERVAL_S="0.2",
            **settings,
        )
        started.append(stage)
        return stage.start()

    yield make
    for stage in started:
        stage.stop()


async def control(env, records: dict) -> None:
    from processors.admission.control import write_control

    await write_control(env.stack.bootstrap_servers, env.topics.control, records)


@pytest.fixture
async def gated(env):
    """A client whose requests go through admission (PREFIX.ingress)."""
    from producers.client import SluiceClient
    from schemas.topics import KafkaConfig

    cfg = KafkaConfig(bootstrap_servers=env.stack.bootstrap_servers, topic_prefix=env.prefix, admission=True)
    async with SluiceClient(cfg, timeout_s=120) as c:
        yield c


async def send_all(client, texts, tenant: str) -> list[dict]:
    from producers.client import make_request

    futs = [await client.send(make_request(t, tenant=tenant)) for t in texts]
    await client.flush()
    return await asyncio.wait_for(asyncio.gather(*futs), 120)


async def test_a_tenant_over_its_rate_is_refused_while_another_is_not(env, admission, worker_factory, gated):
    from producers.corpus import text

    await control(env, {"tenant:noisy": {"requests_per_minute": 30}})
    worker_factory()
    admission()
    noisy, quiet = await asyncio.gather(
        send_all(gated, [text(i, seed=41) for i in range(60)], "noisy"),
        send_all(gated, [text(i, seed=42) for i in range(40)], "quiet"),
    )
    assert [r["status"] for r in quiet] == ["ok"] * 40
    ok = [r for r in noisy if r["status"] == "ok"]
    refused = [r for r in noisy if r["status"] == "rejected"]
    assert len(ok) == 30 and len(refused) == 30  # a minute's allowance at once, then nothing this second
    assert {r["error"]["code"] for r in refused} == {"rate_limited"}
    assert all(0 < r["error"]["retry_after_ms"] <= 60_000 for r in refused)

    # not a valid request: admission passes it through untouched and the worker answers the error
    bad = gated.expect("bad-input-1")
    await gated.send_raw(b'{"v": 1, "id": "bad-input-1", "input": 5, "tenant": "noisy"}', key=b"noisy")
    answer = await asyncio.wait_for(bad, 60)
    assert (answer["status"], answer["error"]["code"]) == ("error", "invalid_input"), answer


async def test_a_budget_is_never_exceeded_by_more_than_one_request_under_four_producers(
    env, admission, worker_factory, gated
):
    """Four producers race one tenant's budget. Reservations are taken at
    admission and settled from telemetry; what the tenant is charged (tokens
    computed at the model's price) stays within the budget."""
    from producers.client import SluiceClient
    from producers.corpus import text
    from schemas.topics import KafkaConfig

    price = 0.02 / 1e6  # USD per token: the built-in models' card
    worker_factory()
    stage = admission()
    assert stage.scrape()['sluice_admission_usd_per_token{model="all-minilm-l6-v2@int8-1"}'] == pytest.approx(price)
    # a budget of about 60 requests' charge; texts new to this run (a Redis hit
    # kept from an earlier run would compute nothing and charge nothing)
    seed = int(env.prefix[1:7], 16)
    probe = await send_all(gated, [text(i, seed=seed) for i in range(100)], "probe")
    budget = 60 * price * sum(r["tokens"] for r in probe) / len(probe)
    await control(env, {"tenant:capped": {"daily_usd": budget}})
    await asyncio.sleep(0.5)

    cfg = KafkaConfig(bootstrap_servers=env.stack.bootstrap_servers, topic_prefix=env.prefix, admission=True)
    clients = [SluiceClient(cfg, timeout_s=120) for _ in range(4)]
    for c in clients:
        await c.start()
    try:
        got = await asyncio.gather(
            *(
                send_all(c, [text(1000 * k + i, seed=seed + 1) for i in range(150)], "capped")
                for k, c in enumerate(clients)
            )
        )
    finally:
        for c in clients:
            await c.stop()
    results = [r for batch in got for r in batch]
    ok = [r for r in results if r["status"] == "ok"]
    refused = [r for r in results if r["status"] == "rejected"]
    charged = price * sum(r["tokens"] for r in ok if r["cache"] == "miss")
    assert refused and {r["error"]["code"] for r in refused} == {"budget_exhausted"}
    assert charged <= budget + price * max(r["tokens"] for r in ok), (charged, budget)
    assert charged >= 0.8 * budget, f"{len(ok)} admitted: a charge of {charged} of {budget} left unused"
    await asyncio.sleep(1.0)  # every reservation settled: the tenants command shows the charge
    assert stage.scrape()["sluice_admission_reserved_usd"] == pytest.approx(0.0, abs=price)


async def test_the_kill_switch_stops_inference_within_a_second(env, admission, worker_factory, gated, client):
    """On: within a second no request reaches the model, whether it comes
    through admission or was already in the workers' topic; off: served again."""
    from producers.client import make_request
    from producers.corpus import text

    w = worker_factory()
    admission()
    assert all(r["status"] == "ok" for r in await send_all(gated, [text(i, seed=60) for i in range(10)], "t"))

    def model_calls() -> float:
        return w.scrape().get("sluice_inference_seconds_count", 0.0)

    await control(env, {"kill_switch": {"on": True, "reason": "test", "at_ms": 0}})
    switched = time.monotonic()
    await asyncio.sleep(1.0)
    calls = model_calls()
    through_admission = await send_all(gated, [text(100 + i, seed=60) for i in range(20)], "t")
    direct = [await client.send(make_request(text(200 + i, seed=60))) for i in range(20)]
    direct_results = await asyncio.wait_for(asyncio.gather(*direct), 60)
    for r in (*through_admission, *direct_results):
        assert (r["status"], r["error"]["code"]) == ("rejected", "kill_switch"), r
    assert model_calls() == calls, "the model ran after the kill switch"
    assert time.monotonic() - switched < 30

    await control(env, {"kill_switch": {"on": False, "reason": "", "at_ms": 0}})
    await asyncio.sleep(1.0)
    after = await send_all(gated, [text(300 + i, seed=60) for i in range(10)], "t")
    assert all(r["status"] == "ok" for r in after)


async def test_a_restarted_stage_keeps_the_counters(env, admission, worker_factory, gated):
    from producers.corpus import text

    await control(env, {"tenant:steady": {"requests_per_minute": 20}})
    worker_factory()
    first = admission()
    seed = int(env.prefix[1:7], 16)  # texts new to this run: computed, so charged
    before = await send_all(gated, [text(i, seed=seed) for i in range(15)], "steady")
    assert all(r["status"] == "ok" for r in before)
    assert first.stop() == 0
    admission()
    after = await send_all(gated, [text(100 + i, seed=seed) for i in range(10)], "steady")
    statuses = [r["status"] for r in after]
    # 5 left of the minute's 20 (a stage that forgot would admit all 10)
    assert statuses.count("ok") == 5 and statuses.count("rejected") == 5, statuses

    # `sluice tenants` shows the limits and what the 20 admitted cost (reserved or settled)
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sluice", "tenants"],
        env=env.worker_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    row = next(line.split() for line in shown.stdout.splitlines() if line.startswith("steady "))
    assert row[1] == "20" and float(row[4]) > 0, shown.stdout  # req/min, used today
    assert "kill switch: off" in shown.stdout


async def test_overload_rejection_starts_at_the_threshold_and_stops_when_the_lag_drains(
    env, admission, worker_factory, gated
):
    from producers.client import make_request
    from producers.corpus import text

    admission(SLUICE_ADMISSION_OVERLOAD_LAG="200", SLUICE_ADMISSION_OVERLOAD_RESUME_LAG="50")
    # no worker yet: admitted requests pile up in PREFIX.requests
    futs = []
    for i in range(600):
        futs.append(await gated.send(make_request(text(i, seed=80), tenant="flood")))
        if i % 50 == 49:
            await gated.flush()
            await asyncio.sleep(0.1)
    await gated.flush()
    await asyncio.sleep(1.0)
    refused = [f.result() for f in futs if f.done()]
    assert refused and {r["status"] for r in refused} == {"rejected"}
    assert {r["error"]["code"] for r in refused} == {"overloaded"}
    admitted = 600 - len(refused)
    assert 200 <= admitted <= 200 + 50 + 100, admitted  # the threshold, plus what arrived within a lag reading
    assert all(r["error"]["retry_after_ms"] > 0 for r in refused)

    worker_factory()  # the backlog drains
    waiting = [f for f in futs if not f.done()]
    assert all(r["status"] == "ok" for r in await asyncio.wait_for(asyncio.gather(*waiting), 120))
    await asyncio.sleep(1.0)
    later = await send_all(gated, [text(1000 + i, seed=80) for i in range(20)], "flood")
    assert all(r["status"] == "ok" for r in later)
