"""The pipeline end to end on the real stack: Kafka broker, worker process, model."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from tokenizers import Tokenizer

from processors.runtime import BUILTIN_MODELS, _resolve, load_card
from producers.client import make_request
from producers.corpus import text
from schemas.records import Result, Telemetry, now_ms
from tests.conftest import AUTOGROUPS, autogroup, read_topic

pytestmark = pytest.mark.integration


class DirectModel:
    """The reference: ONNX Runtime on one text at a time, no batching, no
    padding, written here independently of processors.runtime."""

    def __init__(self) -> None:
        folder = BUILTIN_MODELS / "all-minilm-l6-v2"
        card = load_card(folder)
        self.tok = Tokenizer.from_file(str(_resolve(card.tokenizer, folder)))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=card.max_tokens)
        self.sess = ort.InferenceSession(str(_resolve(card.onnx, folder)), providers=["CPUExecutionProvider"])

    def embed(self, s: str) -> np.ndarray:
        ids = np.array([self.tok.encode(s).ids], dtype=np.int64)
        mask = np.ones_like(ids)
        hidden = self.sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[
            0
        ]
        v = hidden[0].mean(axis=0)
        return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def direct() -> DirectModel:
    return DirectModel()


async def test_2000_requests_come_back_once_each_and_match_direct_onnx(env, worker_factory, client, direct):
    worker_factory()
    texts = [text(i, seed=11) for i in range(2000)]
    results = await client.submit_many(texts, timeout_s=180)

    assert [r.status for r in results] == ["ok"] * 2000
    # exactly once on the results topic: read it back and count by id
    records = await read_topic(env.stack.bootstrap_servers, env.topics.results, expect=2000)
    counts = Counter(orjson.loads(r.value)["id"] for r in records)
    assert len(counts) == 2000 and set(counts.values()) == {1}

    cosines = []
    for t, r in zip(texts, results):
        emb = np.asarray(r.output["embedding"], dtype=np.float32)
        assert emb.shape == (384,)
        assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-3
        cosines.append(float(emb @ direct.embed(t)))
    assert min(cosines) >= 0.999, f"worst cosine {min(cosines):.5f}"
    # they really were batched
    assert max(r.batch_size for r in results) > 1


async def test_the_built_int8_model_answers_the_same_batched_or_alone(env, worker_factory, client):
    """all-minilm-l6-v2-sq8 (the default outside tests) quantises activations
    per call; its card runs one row per call, so an embedding served from a
    batch of 300 equals the same text embedded alone, bit for bit."""
    from pathlib import Path

    from processors.runtime import ModelRuntime
    from sluice.models import FAST_MODEL

    folder = Path(__file__).resolve().parents[2] / ".sluice" / "models" / FAST_MODEL
    assert (folder / "card.json").is_file(), "run `make setup` (sluice model build) first"
    alone = ModelRuntime(folder, intra_op_threads=1).load()
    worker_factory(SLUICE_DEFAULT_MODEL=FAST_MODEL)
    texts = [text(i, seed=13) for i in range(300)]
    results = await client.submit_many(texts, timeout_s=120)
    assert {r.model for r in results} == {f"{FAST_MODEL}@{alone.card.version}"}
    assert max(r.batch_size for r in results) > 1
    for t, r in zip(texts[:40], results[:40]):
        assert np.array_equal(np.asarray(r.output["embedding"], dtype=np.float32), alone.embed([t])[0])


async def test_telemetry_one_record_per_request(env, worker_factory, client):
    worker_factory()
    results = await client.submit_many([text(i, seed=12) for i in range(50)])
    records = await read_topic(env.stack.bootstrap_servers, env.topics.telemetry, expect=50)
    rows = [Telemetry.model_validate(orjson.loads(r.value)) for r in records]
    assert sorted(t.id for t in rows) == sorted(r.id for r in results)
    for t in rows:
        assert t.status == "ok" and t.tokens > 0 and t.cost_usd > 0
        assert t.sent_at_ms <= t.received_at_ms <= t.inference_start_ms <= t.inference_end_ms <= t.published_at_ms


async def test_classify_picks_the_obvious_label(worker_factory, client):
    worker_factory()
    labels = ["sports", "cooking", "finance", "weather", "music"]
    cases = {
        "The striker scored twice and the team won the championship final": "sports",
        "Whisk the eggs with flour and bake the cake for thirty minutes": "cooking",
        "The central bank raised interest rates and stocks fell sharply": "finance",
        "Heavy rain and strong winds are expected with a storm tomorrow": "weather",
        "The band played their new album with guitars and drums all night": "music",
    }
    results = await client.submit_many(list(cases), task="classify", labels=labels)
    for (sentence, want), r in zip(cases.items(), results):
        assert r.status == "ok", r
        assert r.output["label"] == want, (sentence, r.output)
        assert set(r.output["scores"]) == set(labels)
        assert abs(sum(r.output["scores"].values()) - 1.0) < 1e-3


BAD_CASES = [
    # (raw bytes, expected error code, has usable id)
    (b"this is not json", "invalid_json", False),
    (b'["a", "list"]', "invalid_json", False),
    (b'{"input": "no id here"}', "invalid_id", False),
    (b'{"id": 42, "input": "numeric id"}', "invalid_id", False),
    (b'{"id": "bad-input-type", "input": 12}', "invalid_input", True),
    (b'{"id": "bad-missing-input"}', "invalid_input", True),
    (b'{"id": "bad-empty", "input": "   "}', "empty_input", True),
    (b'{"id": "bad-big", "input": "' + b"x" * 9000 + b'"}', "input_too_large", True),
    (b'{"id": "bad-task", "input": "hello", "task": "translate"}', "unknown_task", True),
    (b'{"id": "bad-model", "input": "hello", "model": "gpt-17"}', "unknown_model", True),
    (b'{"id": "bad-nolabels", "input": "hello", "task": "classify"}', "missing_labels", True),
    (
        b'{"id": "bad-manylabels", "input": "hello", "task": "classify", "labels": ['
        + b",".join(b'"l%d"' % i for i in range(65))
        + b"]}",
        "too_many_labels",
        True,
    ),
    (b'{"id": "bad-utf8", "input": "caf\xe9 \xff"}', "invalid_utf8", True),
    (b'{"id": "bad-cache", "input": "hello", "cache": "sometimes"}', "invalid_field", True),
]


async def test_every_bad_input_gets_its_error_and_spares_its_batch(env, worker_factory, client):
    worker_factory(SLUICE_BATCH_MAX_WAIT_MS="200")  # one batch holds good and bad records
    key = b"one-partition"  # all on one partition, so good and bad share batches

    async def send_good(rid: str) -> asyncio.Future:
        fut = client.expect(rid)
        await client.send_raw(orjson.dumps(make_request(f"a fine request {rid}", id=rid)), key=key)
        return fut

    good_before = await send_good("good-1")
    waiting = {}
    for raw, code, has_id in BAD_CASES:
        if has_id:
            rid = orjson.loads(raw.decode("utf-8", "replace"))["id"]
            waiting[rid] = (client.expect(rid), code)
        await client.send_raw(raw, key=key)
    good_after = await send_good("good-2")
    await client.flush()

    for rid, (fut, code) in waiting.items():
        doc = await asyncio.wait_for(fut, 60)
        r = Result.model_validate(doc)
        assert r.status == "error", doc
        assert r.error is not None and r.error.code == code, (rid, doc)
        assert r.error.message  # names the problem
    for fut in (good_before, good_after):
        doc = await asyncio.wait_for(fut, 60)
        assert doc["status"] == "ok" and len(doc["output"]["embedding"]) == 384

    no_id = [(raw, code) for raw, code, has_id in BAD_CASES if not has_id]
    dlq = await read_topic(env.stack.bootstrap_servers, env.topics.dlq, expect=len(no_id))
    docs = [orjson.loads(r.value) for r in dlq]
    import base64

    assert sorted((base64.b64decode(d["value_b64"]), d["code"]) for d in docs) == sorted(no_id)
    for d in docs:
        assert d["reason"] and d["topic"] == env.topics.requests and d["offset"] >= 0


async def test_expired_deadline_is_answered_without_inference(worker_factory, client):
    worker_factory()
    r = await client.submit("too late", deadline_ms=now_ms() - 1000)
    assert r.status == "expired" and r.error.code == "deadline_exceeded"
    assert r.output is None and r.timings_ms.inference == 0
    ok = await client.submit("in time", deadline_ms=now_ms() + 60_000)
    assert ok.status == "ok"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_worker_stopped_halfway_loses_nothing(env, worker_factory, client, sig):
    n = 3000
    w1 = worker_factory(SLUICE_SESSION_TIMEOUT_MS="6000")
    futs = [await client.send(make_request(text(i, seed=20 + sig), id=f"r{sig}-{i}")) for i in range(n)]
    await client.flush()
    while sum(f.done() for f in futs) < n // 3:
        await asyncio.sleep(0.05)
    w1.signal(sig)
    code = await asyncio.to_thread(w1.wait, 60)
    if sig == signal.SIGTERM:
        assert code == 0, w1.log()  # a clean, drained stop
    answered_before = sum(f.done() for f in futs)
    assert answered_before < n, "the worker finished before it was stopped; the test proves nothing"

    worker_factory(SLUICE_SESSION_TIMEOUT_MS="6000")
    docs = await asyncio.wait_for(asyncio.gather(*futs), 240)
    assert all(d["status"] == "ok" for d in docs)
    assert {d["id"] for d in docs} == {f"r{sig}-{i}" for i in range(n)}


async def test_a_worker_joining_mid_run_takes_partitions_and_loses_nothing(env, worker_factory, client):
    """Scale-up under load: the first worker's revoke drains and commits
    while a second joins; every request is answered, by both."""
    n = 3000
    worker_factory()
    futs = [await client.send(make_request(text(i, seed=41), id=f"j-{i}")) for i in range(n)]
    await client.flush()
    while sum(f.done() for f in futs) < n // 4:
        await asyncio.sleep(0.05)
    worker_factory()
    answered_before = sum(f.done() for f in futs)
    assert answered_before < n, "the first worker finished before the second joined; the test proves nothing"
    docs = await asyncio.wait_for(asyncio.gather(*futs), 240)
    assert all(d["status"] == "ok" for d in docs)
    assert {d["id"] for d in docs} == {f"j-{i}" for i in range(n)}
    assert len({d["worker"] for d in docs}) == 2


async def test_the_librdkafka_load_generator_is_answered_and_partitions_like_aiokafka(env, worker_factory):
    """The load generator's default transport: every request answered, each
    on the partition aiokafka (SluiceClient) would pick for its key, so the
    cache affinity of keyed requests holds whichever client sent them."""
    from aiokafka.partitioner import DefaultPartitioner

    from producers.corpus import Workload
    from producers.loadgen import run_load

    worker_factory()
    report = await run_load(
        env.kafka,
        rate=100,
        duration_s=1.0,
        workload=Workload("uniform", 20, seed=3),
        progress=None,
        transport="librdkafka",
    )
    assert report.sent == report.answered == 100 and report.statuses == {"ok": 100}
    records = await read_topic(env.stack.bootstrap_servers, env.topics.requests, expect=100)
    assert len(records) == 100
    parts = list(range(env.partitions))
    java_default = DefaultPartitioner()
    assert all(r.partition == java_default(r.key, parts, parts) for r in records)
    assert len({r.partition for r in records}) > 1  # keys spread, not all on one partition


async def test_the_librdkafka_load_generator_hands_over_a_burst_of_answers_in_slices(env):
    """A model hand-off's answers reach the client together: the generator's
    reader parses and hands them over a slice at a time (so its event loop
    can send between slices), and every answer still reaches its request,
    once. Answers here are written straight to the results topic, all in
    one flush, so they arrive as one burst."""
    from confluent_kafka import Producer

    from producers import rdkafka_client
    from producers.rdkafka_client import RdKafkaClient

    n = 10 * rdkafka_client._HAND_OVER + 5
    handed: list[int] = []
    async with RdKafkaClient(env.kafka) as c:
        deliver = c._deliver
        c._deliver = lambda docs: (handed.append(len(docs)), deliver(docs))  # type: ignore[method-assign]
        futs = [await c.send(make_request(f"burst {i}", id=f"burst-{i}")) for i in range(n)]
        p = Producer({"bootstrap.servers": env.stack.bootstrap_servers})
        for i in range(n):
            p.produce(
                env.topics.results, orjson.dumps({"id": f"burst-{i}", "status": "ok", "n": i}), f"burst-{i}".encode()
            )
        assert p.flush(10) == 0
        docs = await asyncio.wait_for(asyncio.gather(*futs), timeout=30)
    assert [d["n"] for d in docs] == list(range(n))
    assert all(isinstance(d["_received_at_ms"], int) for d in docs)
    assert sum(handed) == n and max(handed) <= rdkafka_client._HAND_OVER
    assert len(handed) >= n // rdkafka_client._HAND_OVER  # sliced, not one hand-over per fetch


async def test_a_burst_of_answers_leaves_the_worker_in_slices_with_a_pause_between(env, worker_factory):
    """One model piece's 192 answers are sent 64 at a time, each slice
    SLUICE_PUBLISH_SLICE_GAP_MS after the one before, so the broker and the
    clients get them spread out, and still every request gets its answer.
    The requests sit on one partition and wait in one batch, so they reach
    the model, and come back from it, together; a record's timestamp is when
    the worker's producer was handed it."""
    from confluent_kafka import Producer

    gap_ms, n = 300, 192
    # one piece for the model (SLUICE_INFERENCE_MAX_ITEMS): its 192 answers leave together
    worker_factory(
        SLUICE_PUBLISH_SLICE_GAP_MS=str(gap_ms),
        SLUICE_BATCH_MAX_ITEMS="1000",
        SLUICE_BATCH_MAX_TOKENS="100000",
        SLUICE_BATCH_MAX_WAIT_MS="2000",
        SLUICE_INFERENCE_MAX_ITEMS="256",
    )
    p = Producer({"bootstrap.servers": env.stack.bootstrap_servers, "linger.ms": 20})
    for i in range(n):
        doc = make_request(f"{env.prefix}: {text(i, seed=41)}", id=f"slice-{i}")  # inputs no cache holds
        p.produce(env.topics.requests, orjson.dumps(doc), partition=0)
    assert p.flush(10) == 0
    records = await read_topic(env.stack.bootstrap_servers, env.topics.results, expect=n, timeout_s=120)
    docs = [orjson.loads(r.value) for r in records]
    assert sorted(d["id"] for d in docs) == sorted(f"slice-{i}" for i in range(n))
    assert {(d["status"], d["cache"]) for d in docs} == {("ok", "miss")}
    stamps = sorted(r.timestamp for r in records)
    pauses = [i for i, d in enumerate(np.diff(stamps)) if d >= 0.8 * gap_ms]
    assert pauses == [63, 127], np.diff(stamps).max()  # after the 64th and the 128th, not after the last


async def test_a_large_hand_off_is_answered_piece_by_piece_as_the_model_computes_it(env, worker_factory):
    """192 misses reach the model in one hand-off, which computes them 64 at
    a time (SLUICE_INFERENCE_MAX_ITEMS); each piece's answers leave as soon as
    that piece is done, so the first piece's answers are with the broker
    before the last piece has been computed. Telemetry says which piece
    computed a request (its inference window)."""
    from confluent_kafka import Producer

    n = 192
    worker_factory(
        SLUICE_INFERENCE_MAX_ITEMS="64",
        SLUICE_PUBLISH_SLICE_GAP_MS="0",
        SLUICE_BATCH_MAX_ITEMS="1000",
        SLUICE_BATCH_MAX_TOKENS="100000",
        SLUICE_BATCH_MAX_WAIT_MS="2000",
    )
    p = Producer({"bootstrap.servers": env.stack.bootstrap_servers, "linger.ms": 20})
    for i in range(n):
        # ~50 words each, so that every piece keeps the model busy for a while
        words = " ".join(text(4 * i + k, seed=43) for k in range(4))
        doc = make_request(f"{env.prefix}: {words}", id=f"piece-{i}")  # inputs no cache holds
        p.produce(env.topics.requests, orjson.dumps(doc), partition=0)
    assert p.flush(10) == 0
    records = await read_topic(env.stack.bootstrap_servers, env.topics.results, expect=n, timeout_s=120)
    telemetry = await read_topic(env.stack.bootstrap_servers, env.topics.telemetry, expect=n, timeout_s=60)
    produced = {orjson.loads(r.value)["id"]: r.timestamp for r in records}
    assert len(produced) == n and {orjson.loads(r.value)["cache"] for r in records} == {"miss"}
    pieces: dict[tuple[int, int], list[str]] = {}
    for r in telemetry:
        t = orjson.loads(r.value)
        pieces.setdefault((t["inference_start_ms"], t["inference_end_ms"]), []).append(t["id"])
    assert sorted(len(ids) for ids in pieces.values()) == [64, 64, 64], sorted(pieces)
    (first_window, first_ids), *_, (last_window, _) = sorted(pieces.items())
    assert all(produced[i] >= first_window[1] for i in first_ids)  # sent once its piece was computed
    assert max(produced[i] for i in first_ids) < last_window[1]  # and before the last piece was


async def test_the_model_runs_in_a_nice_child_whose_death_stops_the_worker_and_loses_nothing(
    env, worker_factory, client
):
    import os

    w1 = worker_factory(SLUICE_MODEL_NICE="7")
    # texts of this test's own: one that Redis already holds (a run before,
    # on a kept stack) is answered from L2 and never reaches the dead model
    warm = f"{env.prefix} warm: the model answers from its own process"
    assert (await client.submit(warm, timeout_s=60)).status == "ok"
    child = w1.model_pid()
    assert os.getpriority(os.PRIO_PROCESS, child) == 7
    assert os.getpriority(os.PRIO_PROCESS, w1.proc.pid) == 0  # the event loop keeps its priority
    # a scheduling group of its own, so the niceness holds against the broker
    # and the clients too, not only against the worker's threads
    assert os.getsid(child) == child != os.getsid(w1.proc.pid)
    group, workers = autogroup(child), autogroup(w1.proc.pid)
    # the worker may sit in the root group (None: started where no session
    # was ever made, as under a CI runner); the model never does
    assert group is not None and group[1] == 7 or not AUTOGROUPS, group
    assert workers is None or (workers[0] != group[0] and workers[1] == 0), workers

    os.kill(child, signal.SIGKILL)
    fut = await client.send(make_request(f"{env.prefix} asked while the model process is gone", id="orphan"))
    await client.flush()
    code = await asyncio.to_thread(w1.wait, 60)
    assert code != 0 and "the model process died" in w1.log(), w1.log()
    assert not fut.done()  # not answered, so not committed either

    worker_factory()  # the partition's next owner reads the request again
    doc = await asyncio.wait_for(fut, 120)
    assert doc["status"] == "ok" and doc["cache"] == "miss"


async def test_a_worker_killed_outright_takes_its_model_process_with_it(env, worker_factory):
    import os
    import time

    w = worker_factory()
    child = w.model_pid()
    w.signal(signal.SIGKILL)
    assert await asyncio.to_thread(w.wait, 30) == -signal.SIGKILL
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        try:  # reap it if it became our child (it does not: init adopts it)
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        await asyncio.sleep(0.2)
    status = Path(f"/proc/{child}/status").read_text() if os.path.exists(f"/proc/{child}") else "gone"
    assert status == "gone" or "State:\tZ" in status, f"model process {child} outlived its worker"
