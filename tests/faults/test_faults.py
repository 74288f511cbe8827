"""Delivery under faults: open-loop load while a fault is injected, then a
read_committed count of the results per request id.

Each scenario runs in both delivery modes and prints one line:
`fault=... mode=... sent=N answered=N lost=N duplicated=N (bound ...)`.

- exactly-once: every fault ends with 0 lost and 0 duplicated results as a
  read_committed consumer sees them.
- at-least-once: 0 lost; duplicates are counted and bounded by what was in
  flight. For a SIGKILLed worker that is measured right after the kill,
  before anything restarts: the records of its partitions between the
  group's committed offset and the log end (its uncommitted rounds, and
  whatever it had not fetched yet, which cannot be duplicated), plus the
  records any worker dropped at a revoke (`revoked ... dropped N`: the L1
  hits among them were answered at intake and are answered again by the
  next owner, as processors/partition_state.py says). Duplicates must also
  lie in those windows. For the broker restart the window is every
  partition's uncommitted records when the broker died. Faults that kill no
  worker (Redis, poison, sink) must show 0 duplicates.

Workers run under a restart policy (`harness.Keeper`), as Kubernetes would
run them: an exactly-once worker whose transaction cannot commit (the broker
died mid-round) exits on purpose, and its restart with the same worker id
fences the old producer and re-reads from the committed offsets. A SIGKILLed
worker is restarted the same way.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.faults import harness
from tests.faults.harness import Keeper, OpenLoop, group_offsets, in_window, read_results, start_all

pytestmark = pytest.mark.faults

MODES = pytest.mark.parametrize("mode", ["exactly-once", "at-least-once"])


def report(fault: str, mode: str, tally: harness.Tally, bound: str) -> None:
    line = tally.line(fault, mode, bound)
    harness.SUMMARY.append(line)
    print(line)


def bound_text(mode: str, bound: int, why: str) -> str:
    """Exactly-once allows no duplicate; what was in flight is said all the same."""
    return f"bound 0; in flight: {why}" if mode == "exactly-once" else f"bound {bound}: {why}"


def workers(sc: harness.Scenario, n: int) -> list[Keeper]:
    return [Keeper(f"{sc.prefix}-w{i}", sc.worker_env(f"w{i}")) for i in range(1, n + 1)]


def settle(sc: harness.Scenario, load: OpenLoop, keepers: list[Keeper], timeout_s: float = 150.0) -> harness.Tally:
    """read_results, with the workers' logs in the failure when it does not settle."""
    try:
        return read_results(sc, load.sent, timeout_s=timeout_s)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(keepers)}\n{stacks(keepers)}") from None


def stacks(keepers: list[Keeper]) -> str:
    """Where each live worker waits (py-spy), for a run that did not settle."""
    import shutil
    import subprocess
    import sys

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = []
    for k in keepers:
        proc = k.current.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)  # the worker logs its tasks' stacks
            time.sleep(1)
            out.append(f"--- {k.name} tasks\n" + k.log_tail(20000))
            dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60)
            out.append(f"--- {k.name} (pid {proc.pid})\n{dump.stdout}{dump.stderr}")
    return "\n".join(out)


def check_delivery(mode: str, tally: harness.Tally, inflight: set[str], dropped: int, keepers: list[Keeper]) -> None:
    """Nothing lost in either mode; nothing twice under exactly-once; under
    at-least-once only what was in flight (read, not committed) at the
    fault, or dropped by a revoke after its L1 hits were answered."""
    assert tally.lost == 0, logs(keepers)
    if mode == "exactly-once":
        assert tally.duplicated == 0, sorted(tally.duplicate_ids)[:10]
    else:
        assert tally.duplicated <= len(inflight) + dropped
        outside = tally.duplicate_ids - inflight
        assert len(outside) <= dropped, f"duplicates outside the in-flight window: {sorted(outside)[:10]}"


def stop_all(keepers: list[Keeper]) -> None:
    for k in keepers:
        k.stop()


def logs(keepers: list[Keeper]) -> str:
    return "\n".join(k.log_tail() for k in keepers)


@MODES
def test_sigkill_one_of_two_workers(scenario_factory, mode: str) -> None:
    """One of two workers is SIGKILLed mid-load and restarted with the same
    worker id. Exactly-once: its open transaction is aborted (by the
    restart's fencing) and its partitions are re-read from the committed
    offsets. At-least-once: its uncommitted rounds are answered again."""
    sc = scenario_factory(mode)
    keepers = workers(sc, 2)
    try:
        start_all(keepers)
        load = OpenLoop(sc, rate=60, duration_s=14).start()
        load.wait_until(5)
        victim = keepers[0]
        parts = victim.assignment()
        assert parts, f"the victim owns no partition\n{logs(keepers)}"
        victim.kill()
        window = group_offsets(sc, parts)  # as the dead worker left them, before any restart
        victim.release()
        load.join()
        tally = settle(sc, load, keepers)
        dropped = sum(k.dropped() for k in keepers)
    finally:
        stop_all(keepers)
    assert victim.restarts >= 1
    inflight = in_window(load.sent, window)
    bound = len(inflight) + dropped
    report(
        "worker-sigkill",
        mode,
        tally,
        bound_text(mode, bound, f"{len(inflight)} uncommitted at the kill + {dropped} dropped"),
    )
    check_delivery(mode, tally, inflight, dropped, keepers)


@MODES
def test_broker_sigkill_and_restart_on_the_same_data(scenario_factory, mode: str) -> None:
    """The broker is SIGKILLed mid-load and started again on its data
    directory three seconds later. The producer's records wait and are
    retried; exactly-once workers whose round was cut exit and are restarted."""
    sc = scenario_factory(mode)
    keepers = workers(sc, 2)
    try:
        start_all(keepers)
        load = OpenLoop(sc, rate=50, duration_s=16).start()
        load.wait_until(4)
        window = group_offsets(sc, range(harness.REQUEST_PARTITIONS))
        pid = sc.stack.broker_pid()
        assert pid is not None
        harness.kill_pid(pid)
        time.sleep(3)
        sc.stack.up()
        load.join()
        tally = settle(sc, load, keepers, timeout_s=200)
        dropped = sum(k.dropped() for k in keepers)
    finally:
        stop_all(keepers)
    # the outage expires the workers' sessions: a round answered meanwhile
    # whose commit is then refused ("Unknown member") is in flight too
    inflight = in_window(load.sent, harness.widened(window, harness.failed_commits(keepers)))
    bound = len(inflight) + dropped
    restarts = sum(k.restarts for k in keepers)
    report(
        "broker-restart",
        mode,
        tally,
        bound_text(
            mode,
            bound,
            f"{len(inflight)} uncommitted at the kill or in refused commits + {dropped} dropped; {restarts} worker restarts",
        ),
    )
    check_delivery(mode, tally, inflight, dropped, keepers)


@MODES
def test_redis_stopped_for_20_seconds(scenario_factory, mode: str) -> None:
    """Redis is killed for 20 s mid-load, then started again: the worker
    serves from L1 and the model meanwhile, and never restarts."""
    sc = scenario_factory(mode)
    keepers = workers(sc, 1)
    try:
        start_all(keepers)
        load = OpenLoop(sc, rate=40, duration_s=26).start()
        load.wait_until(3)
        pid = sc.stack.redis_pid()
        assert pid is not None
        harness.kill_pid(pid)
        load.wait_until(23)
        sc.stack.up()
        load.join()
        tally = settle(sc, load, keepers)
    finally:
        stop_all(keepers)
    report("redis-outage-20s", mode, tally, "bound 0: no worker killed")
    assert keepers[0].restarts == 0, logs(keepers)
    # the outage reached the worker, and it found Redis again
    log = keepers[0].logs()[0]
    failed = re.search(r"L2 cache: redis \w+ failed", log)
    assert failed and "answering" in log[failed.end() :], keepers[0].log_tail()
    assert tally.lost == 0, logs(keepers)
    assert tally.duplicated == 0, sorted(tally.duplicate_ids)[:10]
    assert {d["status"] for docs in tally.results.values() for d in docs} == {"ok"}


@MODES
def test_a_poison_input_fails_alone(scenario_factory, mode: str) -> None:
    """A request that makes the model raise (700 words for a network of 512
    positions whose card allows 1024 tokens) gets an error result; the
    requests produced with it to the same partition in one burst (its
    batch-mates, same model) are answered ok, and so is everything the
    partition receives after it."""
    sc = scenario_factory(mode)
    keepers = workers(sc, 1)
    try:
        start_all(keepers)
        load = OpenLoop(sc, rate=50, duration_s=12).start()
        load.wait_until(4)
        burst = [
            harness.make_request(f"{sc.prefix} batch-mate {i}", id=f"{sc.prefix}-mate-{i}", model="minilm-long")
            for i in range(6)
        ]
        poison = harness.make_request("word " * 700, id=f"{sc.prefix}-poison", model="minilm-long")
        for doc in [*burst[:3], poison, *burst[3:]]:
            load.produce(doc, partition=0)
        load.join()
        tally = settle(sc, load, keepers)
    finally:
        stop_all(keepers)
    mates = [tally.results[d["id"]][0] for d in burst]
    (bad,) = tally.results[poison["id"]]
    sizes = [m.get("batch_size") for m in mates]
    report("poison-input", mode, tally, f"bound 0: no worker killed; batch-mates' batch_size={sizes}")
    assert keepers[0].restarts == 0, logs(keepers)
    assert tally.lost == 0 and tally.duplicated == 0, (tally.lost, sorted(tally.duplicate_ids)[:10])
    assert bad["status"] == "error" and bad["error"]["code"] == "model_error", bad
    assert [m["status"] for m in mates] == ["ok"] * len(burst), mates
    assert all(m["model"].startswith("minilm-long@") for m in mates)
    # the partition moved on: what arrived after the poison was answered
    poison_at = load.sent[poison["id"]]
    later = [rid for rid, s in load.sent.items() if s.partition == poison_at.partition and s.offset > poison_at.offset]
    assert later and all(tally.results[rid][0]["status"] == "ok" for rid in later)


@MODES
def test_sink_sigkill_mid_insert(scenario_factory, mode: str) -> None:
    """The sink is SIGKILLed while telemetry flows (small blocks, so the kill
    lands among inserts and commits) and restarted on its chDB folder: its
    deduplication tokens make the replayed blocks idempotent, so the table
    holds each request exactly once."""
    sc = scenario_factory(mode)
    keepers = workers(sc, 1)
    sink_port = harness.supervisor.free_port()
    sink = Keeper(
        f"{sc.prefix}-sink",
        sc.sink_env(
            sc.tmp / f"chdb-{sc.prefix}",
            SLUICE_SINK_PORT=str(sink_port),
            SLUICE_SINK_BATCH_MAX_ROWS="40",
            SLUICE_SINK_BATCH_MAX_S="0.1",
        ),
        command="sink",
    )
    try:
        start_all([*keepers, sink])
        load = OpenLoop(sc, rate=50, duration_s=12).start()
        load.wait_until(5)
        stored = 0
        deadline = time.monotonic() + 30
        while stored <= 0 and time.monotonic() < deadline:
            stored = harness.sink_counts(sink_port)[0]
            time.sleep(0.05)
        sink.kill()
        sink.release()
        load.join()
        tally = settle(sc, load, keepers)
        rows = ids = -1
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            rows, ids = harness.sink_counts(sink_port)
            if rows >= tally.sent:
                time.sleep(2)  # a late replayed block would show now
                rows, ids = harness.sink_counts(sink_port)
                break
            time.sleep(0.5)
    finally:
        stop_all([*keepers, sink])
    report(
        "sink-sigkill",
        mode,
        tally,
        f"bound 0: no worker killed; telemetry rows={rows} distinct ids={ids}, {stored} stored at the kill",
    )
    assert 0 < stored < tally.sent, f"{stored} rows at the kill"
    assert sink.restarts == 1, sink.log_tail()
    assert tally.lost == 0 and tally.duplicated == 0, (tally.lost, sorted(tally.duplicate_ids)[:10])
    assert (rows, ids) == (tally.sent, tally.sent), sink.log_tail()
