"""Exactly-once delivery on the real stack: each round of a worker is one
Kafka transaction holding its results, its telemetry and its offsets."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest

from producers.corpus import text
from tests.conftest import read_topic

pytestmark = pytest.mark.integration


async def test_two_exactly_once_workers_answer_each_request_once_in_committed_transactions(env, worker_factory, client):
    for _ in range(2):
        worker_factory(SLUICE_DELIVERY="exactly-once", SLUICE_TRANSACTION_TIMEOUT_MS="5000")
    # repeats too: early answers (L1 hits, coalesced) must wait for their round
    first = [f"{env.prefix} {text(i % 700, seed=5)}" for i in range(800)]
    again = first[:400]  # cache hits, answered after the first round committed
    results = await client.submit_many(first, timeout_s=180) + await client.submit_many(again, timeout_s=180)
    texts = first + again
    assert [r.status for r in results] == ["ok"] * len(texts)
    assert {r.cache for r in results[:800]} == {"miss", "coalesced"}
    assert {r.cache for r in results[800:]} <= {"l1", "l2"}

    boot = env.stack.bootstrap_servers
    committed = await read_topic(boot, env.topics.results, expect=len(texts), isolation_level="read_committed")
    ids = Counter(orjson.loads(r.value)["id"] for r in committed)
    assert len(ids) == len(texts) and set(ids.values()) == {1}
    telemetry = await read_topic(boot, env.topics.telemetry, expect=len(texts), isolation_level="read_committed")
    assert Counter(orjson.loads(r.value)["id"] for r in telemetry) == ids
    # what a read_uncommitted reader sees is the same records plus nothing
    # aborted: no round failed
    everything = await read_topic(boot, env.topics.results, expect=len(texts))
    assert len(everything) == len(committed)


async def test_a_reply_to_the_broker_refuses_is_an_error_result_not_a_failed_round(env, worker_factory, client):
    # a refused write would abort the round's transaction, and the round
    # would be refused again on every retry
    worker = worker_factory(SLUICE_DELIVERY="exactly-once")
    bad = await client.submit("hello", reply_to="__consumer_offsets", timeout_s=60)
    good = await client.submit("hello again", timeout_s=60)
    assert (bad.status, bad.error.code if bad.error else None) == ("error", "invalid_field")
    assert "internal topics" in bad.error.message
    assert good.status == "ok"
    assert worker.proc is not None and worker.proc.poll() is None
