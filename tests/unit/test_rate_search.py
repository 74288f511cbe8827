"""The search for the highest rate under an SLO, against a queue model whose
capacity is known: the search must land between the last rate the model
sustains and the first it cannot."""

import asyncio

import pytest

from producers.loadgen import LoadReport, find_max_rate, step_passes


def queue_model(capacity: float, seconds: float = 10.0):
    """p99 latency of an open-loop run on a server of `capacity` per second:
    flat below capacity, growing with the backlog above it."""
    calls: list[tuple[float, int]] = []

    async def run_step(rate: float, step: int) -> LoadReport:
        calls.append((rate, step))
        n = int(rate * seconds)
        backlog_s = max(0.0, (rate - capacity) * seconds / capacity)
        r = LoadReport(rate=rate, duration_s=seconds, sent=n, answered=n, statuses={"ok": n})
        r.latency_ms = {"p50": 20.0 + backlog_s * 500, "p99": 40.0 + backlog_s * 1000}
        r.throughput_rps = min(rate, capacity)
        return r

    return run_step, calls


def test_search_brackets_the_capacity_and_numbers_the_steps():
    run_step, calls = queue_model(capacity=700)
    search = asyncio.run(find_max_rate(run_step, slo_ms=500, start_rate=100, factor=2, refine=2, progress=None))
    rates = [r for r, _ in calls]
    assert rates[:4] == [100, 200, 400, 800]  # 800: backlog 1.4 s, p99 ~1.5 s -> fail
    assert [s for _, s in calls] == list(range(len(calls)))
    # 700 + 700*0.46/10 ≈ 732/s is the true edge of p99 < 500 ms
    assert 600 <= search.max_rate <= 732
    assert search.best["rate"] == search.max_rate and search.best["pass"]
    assert [s["pass"] for s in search.steps[:4]] == [True, True, True, False]


def test_unanswered_or_failed_requests_fail_a_step_whatever_the_latency():
    r = LoadReport(rate=10, duration_s=1, sent=10, answered=9, unanswered=1, statuses={"ok": 9})
    r.latency_ms = {"p99": 5.0}
    assert not step_passes(r, 500)
    r = LoadReport(rate=10, duration_s=1, sent=10, answered=10, statuses={"ok": 9, "error": 1})
    r.latency_ms = {"p99": 5.0}
    assert not step_passes(r, 500)


def test_no_passing_step_reports_zero_and_bad_arguments_are_refused():
    run_step, _ = queue_model(capacity=10)
    search = asyncio.run(find_max_rate(run_step, start_rate=100, progress=None))
    assert search.max_rate == 0 and search.best is None and len(search.steps) == 1
    with pytest.raises(ValueError, match="factor"):
        asyncio.run(find_max_rate(run_step, factor=1.0, progress=None))


def test_the_cap_is_tried_last_and_ends_the_search():
    run_step, calls = queue_model(capacity=10_000)
    search = asyncio.run(find_max_rate(run_step, start_rate=100, factor=2, max_rate=500, progress=None))
    assert [r for r, _ in calls] == [100, 200, 400, 500]
    assert search.max_rate == 500


class EchoTransport:
    """Answers every request on the next loop turn (the load generator's
    transport protocol, in process: this tests the generator, not Kafka)."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, doc):
        from schemas.records import now_ms

        self.sent.append(doc)
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(
            fut.set_result, {"id": doc["id"], "status": "ok", "cache": "l1", "_received_at_ms": now_ms()}
        )
        return fut

    async def flush(self) -> None:
        return None


def test_run_load_hands_every_answer_and_its_latency_to_on_answer():
    from producers.loadgen import run_load

    seen: list[tuple[str, float]] = []
    transport = EchoTransport()
    report = asyncio.run(
        run_load(
            None,
            rate=200,
            duration_s=0.25,
            client=transport,
            progress=None,
            on_answer=lambda doc, lat: seen.append((doc["id"], lat)),
        )
    )
    assert report.sent == report.answered == len(transport.sent) == 50
    assert sorted(i for i, _ in seen) == sorted(d["id"] for d in transport.sent)
    assert all(lat >= 0 for _, lat in seen) and report.cache == {"l1": 50}
