"""`sluice autoscale --local` on the real stack: a real broker, real workers, the
sink storing telemetry and decisions in real chDB.

Settings are shrunk to seconds (interval 2 s, window 10 s, idle 14 s) so a
whole day's shape (quiet, a step, a drain, quiet again, a new request) fits
in a couple of minutes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from sinks.query_endpoint import remote_runner
from tests.conftest import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

INTERVAL_S = 2.0
WINDOW_S = 10.0
IDLE_S = 14.0
DRAIN_S = 8.0
MAX_WORKERS = 3
BURST = 2500


class Watch:
    """The autoscaler's gauges, sampled every 0.2 s: (t, desired, ready, lag);
    and (t, recommended) apart."""

    def __init__(self, scaler: WorkerProcess) -> None:
        self.scaler = scaler
        self.samples: list[tuple[float, float, float, float]] = []
        self.recommended: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                m = await asyncio.to_thread(self.scaler.scrape)
                self.samples.append(
                    (
                        time.monotonic(),
                        m["sluice_autoscale_desired_workers"],
                        m["sluice_autoscale_ready_workers"],
                        m["sluice_autoscale_lag_records"],
                    )
                )
                self.recommended.append((time.monotonic(), m["sluice_autoscale_recommended_workers"]))
            except OSError:
                pass
            await asyncio.sleep(0.2)

    def __enter__(self) -> Watch:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def until(self, what: str, pred, timeout_s: float) -> float:
        """Wait until pred(desired, ready, lag) holds; the time it first did."""
        deadline = time.monotonic() + timeout_s
        seen = len(self.samples)
        while time.monotonic() < deadline:
            for t, d, r, lag in self.samples[seen:]:
                if pred(d, r, lag):
                    return t
            seen = len(self.samples)
            await asyncio.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout_s:.0f} s; last {self.samples[-5:]}\n{self.scaler.log()}")


async def test_the_fleet_follows_a_step_drains_scales_down_to_zero_and_wakes(env, client, tmp_path):
    from producers.client import make_request
    from producers.corpus import text

    sink = WorkerProcess(
        env,
        "sink",
        SLUICE_SINK_GROUP_ID=f"{env.prefix}-sink",
        SLUICE_CHDB_PATH=str(tmp_path / "chdb"),
        SLUICE_SINK_BATCH_MAX_S="0.3",
    ).start()
    scaler = WorkerProcess(
        env,
        "autoscale",
        ("--local",),
        SLUICE_STATE_DIR=str(tmp_path / "state"),
        SLUICE_SINK_PORT=str(sink.port),
        SLUICE_AUTOSCALE_INTERVAL_S=str(INTERVAL_S),
        SLUICE_AUTOSCALE_LOOKBACK_S="6",
        SLUICE_AUTOSCALE_TARGET_DRAIN_S=str(DRAIN_S),
        SLUICE_AUTOSCALE_SCALE_DOWN_WINDOW_S=str(WINDOW_S),
        SLUICE_AUTOSCALE_IDLE_S=str(IDLE_S),
        SLUICE_AUTOSCALE_MAX_WORKERS=str(MAX_WORKERS),
        SLUICE_AUTOSCALE_INITIAL_SERVICE_RPS="100",
        SLUICE_AUTOSCALE_COLD_START_S="3",
    )
    try:
        scaler.start()
        with Watch(scaler) as watch:
            # quiet: nothing produced, nothing started
            await asyncio.sleep(3 * INTERVAL_S)
            assert watch.samples and all(d == 0 and r == 0 for _, d, r, _ in watch.samples), watch.samples

            # low load wakes one worker; everything sent is answered
            sent = time.monotonic()
            low = [await client.send(make_request(text(i))) for i in range(10)]
            woke = await watch.until("wake on the first lag", lambda d, r, lag: d >= 1, 3 * INTERVAL_S)
            assert woke - sent <= 2 * INTERVAL_S + 1
            await watch.until("one worker ready", lambda d, r, lag: r >= 1, 60)
            for i in range(10, 60):
                low.append(await client.send(make_request(text(i))))
                await asyncio.sleep(0.1)
            await asyncio.wait_for(asyncio.gather(*low), 60)

            # a step: a burst far beyond one worker's drain target adds workers within two intervals
            step = time.monotonic()
            burst = [await client.send(make_request(text(1000 + i))) for i in range(BURST)]
            await client.flush()
            up = await watch.until("scale up on the step", lambda d, r, lag: d >= 2, 2 * INTERVAL_S + 1.5)
            assert up - step <= 2 * INTERVAL_S + 1.5
            await watch.until("added workers ready", lambda d, r, lag: r >= 2, 60)
            results = await asyncio.wait_for(asyncio.gather(*burst), 240)
            assert all(r["status"] == "ok" for r in results)
            await watch.until("lag drained", lambda d, r, lag: lag == 0, 30)
            assert max(lag for _, _, _, lag in watch.samples) >= BURST // 2  # the step was seen as lag

            # quiet again: down only after the window, to zero after the idle period
            last_load = time.monotonic()
            peak = max(d for _, d, _, _ in watch.samples)
            down = await watch.until("scale down", lambda d, r, lag: d < peak, WINDOW_S + IDLE_S + 6 * INTERVAL_S)
            # every interval of the window before it wanted fewer (sampled between ticks: one interval's slack)
            last_peak = max(t for t, rec in watch.recommended if rec >= peak and t < down)
            assert down - last_peak >= WINDOW_S - INTERVAL_S - 1, "shrank before the scale-down window"
            zero = await watch.until("to zero", lambda d, r, lag: d == 0 and r == 0, IDLE_S + 8 * INTERVAL_S)
            assert zero - last_load >= IDLE_S - INTERVAL_S - 1, "went to zero before the idle period"

            # a new request wakes it and is answered
            t_wake = time.monotonic()
            late = await client.send(make_request(text(9999)))
            woke_again = await watch.until("wake from zero", lambda d, r, lag: d >= 1, 3 * INTERVAL_S)
            assert woke_again - t_wake <= 2 * INTERVAL_S + 1
            assert (await asyncio.wait_for(late, 90))["status"] == "ok"

        # every decision is in autoscale_events, through the sink's SQL endpoint
        wanted = {"wake", "scale_up", "scale_down", "to_zero"}
        deadline = time.monotonic() + 20
        while True:
            cols, rows = await asyncio.to_thread(
                remote_runner("127.0.0.1", sink.port),
                "SELECT reason, count() AS n, max(desired) AS most FROM sluice.autoscale_events GROUP BY reason",
            )
            got = {r[0]: (r[1], r[2]) for r in rows}
            if wanted <= set(got) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        assert wanted <= set(got), got
        assert got["wake"][0] >= 2  # from zero twice
        assert got["scale_up"][1] <= MAX_WORKERS
        log = scaler.log()
        assert "to_zero" in log and "scale_up" in log
    finally:
        scaler.stop()
        sink.stop()
        # the autoscaler stops the workers it started: none is left running
        leftovers = [p for p in Path("/proc").glob("[0-9]*") if _is_worker_of(p, env.prefix)]
        assert not leftovers, f"workers left running: {leftovers}"


def _is_worker_of(proc_dir: Path, prefix: str) -> bool:
    try:
        cmd = (proc_dir / "cmdline").read_bytes()
        environ = (proc_dir / "environ").read_bytes()
    except OSError:
        return False
    return b"sluice\x00worker" in cmd and f"SLUICE_TOPIC_PREFIX={prefix}".encode() in environ


def _scaler(env, analytics, bootstrap: str | None = None, **knobs):
    from schemas.topics import KafkaConfig
    from sluice.autoscale.actuators import Recommend
    from sluice.autoscale.config import AutoscaleConfig
    from sluice.autoscale.loop import Autoscaler

    cfg = AutoscaleConfig(
        autoscale_interval_s=0.5,
        autoscale_lookback_s=1,
        autoscale_idle_s=1,
        autoscale_scale_down_window_s=0,
        autoscale_port=0,
        **knobs,
    )
    kafka = KafkaConfig(bootstrap_servers=bootstrap or env.stack.bootstrap_servers, topic_prefix=env.prefix)
    return Autoscaler(cfg, kafka, f"{env.prefix}-workers", Recommend(), analytics, instance="test")


async def test_no_analytics_answer_is_said_once_and_never_scales_the_group_to_zero(env, worker_factory, client, caplog):
    """--recommend next to a running worker, with the analytics store gone: the
    decision stays at the group's one worker past the idle period, the log says
    why once, and each decision is recorded on PREFIX.autoscale."""
    from producers.client import make_request
    from sinks.query_endpoint import remote_runner
    from sluice.autoscale.signals import AnalyticsSignals
    from sluice.supervisor import free_port
    from tests.conftest import read_topic

    worker_factory()
    await asyncio.wait_for(await client.send(make_request("a first request, so the group commits")), 60)
    scaler = _scaler(env, AnalyticsSignals(remote_runner("127.0.0.1", free_port(), timeout_s=1), "sluice"))
    await scaler.start()
    try:
        decisions = []
        for _ in range(8):  # 4 s: four times the idle period
            decisions.append(await scaler.tick())
            await asyncio.sleep(0.5)
    finally:
        await scaler.close()
    assert all(d.desired == 1 and "analytics" in d.missing for d in decisions), decisions
    said = [r for r in caplog.records if "analytics input missing" in r.getMessage()]
    assert len(said) == 1
    recorded = await read_topic(env.stack.bootstrap_servers, env.topics.autoscale, expect=len(decisions))
    docs = [orjson.loads(r.value) for r in recorded]
    assert [d["desired"] for d in docs] == [1] * len(decisions)
    # (a tick may also find the request's partition not committed yet: "commits")
    assert all(d["mode"] == "recommend" and "analytics" in d["missing"] for d in docs), docs


async def test_no_broker_answer_keeps_the_last_decision_and_says_so_once(env, caplog):
    from sluice.autoscale.policy import Observation
    from sluice.supervisor import free_port

    scaler = _scaler(env, None, bootstrap=f"127.0.0.1:{free_port()}")
    await scaler.start()
    try:
        # the last decision it had before the broker went
        scaler.policy.decide(Observation(at_s=time.monotonic(), lag={0: 9000}, partitions=6, ready=1, service_rps=100))
        before = scaler.policy.last.desired
        decisions = [await scaler.tick() for _ in range(3)]
    finally:
        await scaler.close()
    assert before >= 2
    assert [(d.desired, d.reason) for d in decisions] == [(before, "no_broker")] * 3
    assert len([r for r in caplog.records if "broker input missing" in r.getMessage()]) == 1
