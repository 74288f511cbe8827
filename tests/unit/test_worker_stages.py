"""Each worker stage alone, on in-memory fakes of the consumer, the
publishers, the model and Redis (tests/unit/fakes.py). The same stages run
on the real broker, Redis and model in tests/integration/test_pipeline.py."""

from __future__ import annotations

import asyncio

import pytest

from processors.answers import AnswerSender
from processors.batching import Batcher, BatchPolicy, PartitionBatch
from processors.checkpoint import Checkpoint
from processors.coalescing import Coalescer
from processors.handoff import Handoff
from processors.inference import ModelStage
from processors.intake import Intake
from processors.items import Group, Item
from processors.lookup import Lookup
from processors.metrics import WorkerMetrics
from processors.partition_state import PartitionState
from schemas.records import Result, Telemetry, now_ms
from tests.unit.fakes import (
    TOPICS,
    FakeConsumer,
    FakeL2,
    FakeModel,
    FakePublisher,
    Log,
    Message,
    caches,
    card,
    config,
    request,
)


class Rig:
    """The stages wired as the worker wires them, on fakes."""

    def __init__(self, l2: FakeL2 | None = None, **cfg) -> None:
        self.cfg = config(**cfg)
        self.log = Log()
        self.metrics = WorkerMetrics()
        self.cache_metrics, self.l1, real_l2 = caches(self.metrics)
        self.l2 = l2 if l2 is not None else real_l2
        self.results, self.bulk = FakePublisher(self.log, "results"), FakePublisher(self.log, "bulk")
        self.consumer = FakeConsumer(self.log)
        self.model = FakeModel(self.log)
        self.models = {"mini": card("mini"), "cls": card("cls", tasks=("classify",))}
        self.prices = {n: c.price_per_compute_hour_usd for n, c in self.models.items()}
        self.state = PartitionState(
            self.metrics,
            max_pending_items=self.cfg.max_pending_items,
            max_uncommitted_items=self.cfg.max_uncommitted_items,
        )
        self.state.assigned = {0, 1, 2}
        self.coalescer = Coalescer()
        self.batcher: Batcher[Item] = Batcher(
            BatchPolicy(self.cfg.batch_max_items, self.cfg.batch_max_tokens, self.cfg.batch_max_wait_ms)
        )
        self.stop_reason: str | None = None  # the kill switch, as the worker reads it from PREFIX.control
        self.pending: Handoff[PartitionBatch[Item]] = Handoff("pending")
        self.model_queue: Handoff[Group] = Handoff("model")
        self.to_publish: Handoff[Group] = Handoff("publish")
        self.sender = AnswerSender(
            topics=TOPICS,
            worker_id="w1",
            results=self.results,
            bulk=self.bulk,
            metrics=self.metrics,
            cache_metrics=self.cache_metrics,
            prices=self.prices,
            default_model="mini",
            slice_gap_ms=0,
        )
        self.intake = Intake(self.cfg, self.models, self.batcher, self.l1, self.state, self.pending, self.sender)
        self.lookup = Lookup(
            group_max_items=self.cfg.group_max_items,
            l1=self.l1,
            l2=self.l2,
            coalescer=self.coalescer,
            sender=self.sender,
            state=self.state,
            metrics=self.metrics,
            cache_metrics=self.cache_metrics,
            stopped=lambda: self.stop_reason,
        )
        self.modelled = ModelStage(
            model=self.model,
            group_max_items=self.cfg.group_max_items,
            inference_max_items=self.cfg.inference_max_items,
            l1=self.l1,
            coalescer=self.coalescer,
            sender=self.sender,
            state=self.state,
            metrics=self.metrics,
            prices=self.prices,
            stopped=lambda: self.stop_reason,
        )
        self.checkpoint = Checkpoint(
            sender=self.sender,
            l2=self.l2,
            committer=self.consumer,
            state=self.state,
            metrics=self.metrics,
            publish_max_items=self.cfg.publish_max_items,
        )

    def group(self, partition: int, raws: list[bytes | None], first_offset: int = 0) -> Group:
        """Records taken in and batched, as one group taken by the lookup."""
        self.intake.take_in(partition, [Message(first_offset + i, r) for i, r in enumerate(raws)])
        batches = self.batcher.take_ready(now=1e12)
        self.state.batched(sum(len(b) for b in batches))
        self.state.grouped(sum(len(b) for b in batches))
        return Group(batches)

    def answers(self) -> dict[str, dict]:
        return {d["id"]: d for d in self.results.docs(TOPICS.results)}


# -- the hand-off -----------------------------------------------------------------
async def test_a_handoff_hands_over_runs_by_its_rule_and_ends_after_close():
    h: Handoff[int] = Handoff("h")
    h.extend([1, 2, 3, 4])
    assert await h.take(3, lambda x: x) == [1, 2]  # whole entries within the limit
    h.put(5)
    assert await h.take(4, lambda x: x, whole=False) == [3, 4]  # until the limit is reached
    assert h.remove(lambda x: x == 5) == [5]
    h.extend([3])
    waiting = asyncio.ensure_future(h.take())
    await asyncio.sleep(0)
    assert await waiting == [3]
    waiting = asyncio.ensure_future(h.take())
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing there: it waits, it does not spin or return
    h.close()
    assert await waiting == []
    with pytest.raises(RuntimeError, match="closed"):
        h.put(5)


# -- coalescing ---------------------------------------------------------------------
def test_identical_misses_follow_the_first_and_lead_anew_once_it_is_released():
    rig = Rig()
    g = rig.group(0, [request(1, "same text"), request(2, "same text"), request(3, "other")])
    a, b, c = g.items
    assert [rig.coalescer.join(x) for x in (a, b, c)] == [False, True, False]
    assert b.leader is a and a.followers == [b] and b.cache == "coalesced"
    rig.coalescer.release(a)
    d = rig.group(0, [request(4, "same text")], first_offset=3).items[0]
    assert rig.coalescer.join(d) is False  # a's computation is over: d leads
    a.dropped = True
    assert rig.coalescer.orphaned(b) and b.leader is None and b.cache == "miss"


# -- intake ---------------------------------------------------------------------------
async def test_intake_parses_keys_and_batches_and_answers_l1_hits_at_once():
    rig = Rig()
    first = rig.group(0, [request(1, "Hello  World")])
    known = first.items[0].serve
    assert known is not None
    rig.l1.put(known.key_hash, b'{"embedding":[1]}')
    hits = rig.intake.take_in(
        1,
        [
            Message(0, request(2, "hello world")),  # the same text, normalised: an L1 hit
            Message(1, b"not json"),
            Message(2, request(3, "x", model="nope")),
            Message(3, request(4, "x", task="classify", labels=["a", "b"])),  # mini only embeds
            Message(4, request(5, "x", cache="bypass")),
        ],
    )
    assert [it.request_id for it in hits] == ["r2"] and hits[0].cache == "l1"
    [batch] = rig.batcher.take_ready(now=1e12)
    assert [it.offset for it in batch.items] == [0, 1, 2, 3, 4]  # every record, in offset order
    bad, unknown, unsupported, bypass = batch.items[1:]
    assert bad.serve is None and bad.error is not None and bad.request_id is None
    assert unknown.serve is None and unknown.error.code == "unknown_model" and unknown.request_id == "r3"
    assert unsupported.error.code == "unsupported_task"
    assert bypass.serve is not None and bypass not in hits


async def test_intake_pauses_when_full_and_on_stop_drops_and_closes():
    rig = Rig(max_pending_items=2, max_uncommitted_items=10)
    rig.consumer.batches = [{0: [Message(i, request(i, f"text {i}")) for i in range(3)]}, {0: [Message(3, request(3))]}]
    stopping = asyncio.Event()
    dropped: list[int] = []
    run = asyncio.ensure_future(rig.intake.run(rig.consumer, stopping, lambda: dropped.append(1) or 7))
    for _ in range(50):
        await asyncio.sleep(0.002)
    # three records read and batched: past max_pending_items, so the second fetch waits
    assert rig.state.pending_items == 3 and len(rig.consumer.batches) == 1
    stopping.set()
    rig.state.room_made()
    await asyncio.wait_for(run, 2)
    assert dropped == [1] and rig.pending.closed


# -- lookup ---------------------------------------------------------------------------
async def test_lookup_answers_errors_expiries_and_hits_at_once_with_one_mget():
    l2 = FakeL2(Log())
    rig = Rig(l2=l2)
    g = rig.group(
        0,
        [
            request(1, "in l1"),
            request(2, "in l2"),
            request(3, "miss a"),
            request(4, "miss a"),
            b"{broken",
            request(5, "late", deadline_ms=now_ms() - 1000),
            request(6, "miss b"),
        ],
    )
    l1_item, l2_item = g.items[0], g.items[1]
    rig.l1.put(l1_item.serve.key_hash, b'{"embedding":[1]}')
    from processors.cache import storage_key

    l2.data[storage_key("mini@1", l2_item.serve.key_hash)] = b'{"embedding":[2]}'
    await rig.lookup.look_up(g)
    # one MGET, one key each for the in-L2 text and the two missing texts (miss a asked once)
    assert len(l2.gets) == 1 and len(l2.gets[0]) == 3
    assert [it.cache for it in g.items] == ["l1", "l2", "miss", "coalesced", "none", "none", "miss"]
    answers = rig.answers()
    assert set(answers) == {"r1", "r2", "r5"}  # the hits and the expired one went at once
    assert answers["r5"]["status"] == "expired" and answers["r5"]["error"]["code"] == "deadline_exceeded"
    assert answers["r1"]["output"] == {"embedding": [1]} and answers["r2"]["cache"] == "l2"
    [dlq] = rig.bulk.docs(TOPICS.dlq)  # no id to answer: the record goes to the DLQ, with where it was
    assert (dlq["partition"], dlq["offset"], dlq["topic"]) == (0, 4, TOPICS.requests)
    assert rig.l1.get(l2_item.serve.key_hash) == b'{"embedding":[2]}'  # an L2 hit moves to L1
    for doc in answers.values():
        Result.model_validate(doc)


async def test_lookup_takes_pending_batches_up_to_the_group_size_and_closes_after():
    rig = Rig(group_max_items=4)
    for p in range(3):
        rig.intake.take_in(p, [Message(i, request(f"{p}-{i}", f"p{p} text {i}")) for i in range(2)])
    rig.intake.move_ready(1e12)
    rig.pending.close()
    await rig.lookup.run(rig.pending, rig.model_queue)
    groups = [g async for g in _drain(rig.model_queue)]
    assert [len(g.items) for g in groups] == [4, 2]
    assert rig.state.awaiting_model == 6 and rig.model_queue.closed


async def _drain(h: Handoff):
    while entries := await h.take():
        for e in entries:
            yield e


# -- the model hand-off -----------------------------------------------------------------
async def test_model_answers_each_piece_before_the_next_is_computed():
    rig = Rig(inference_max_items=2)
    g = rig.group(0, [request(i, "word " * (i + 1)) for i in range(5)])
    await rig.lookup.look_up(g)
    seen: list[int] = []
    rig.model.between = lambda: _note(seen, len(rig.answers()))
    await rig.modelled.infer([g])
    assert [len(p) for p in rig.model.pieces] == [2, 2, 1]
    assert seen == [2, 4]  # before each later piece, the earlier ones were answered
    assert [p[0].text for p in rig.model.pieces][0] == "word "  # shortest first


async def _note(seen: list[int], n: int) -> None:
    seen.append(n)


async def test_the_kill_switch_refuses_misses_at_lookup_and_stops_the_model_between_pieces():
    rig = Rig(inference_max_items=2)
    rig.stop_reason = "runaway cost"
    g = rig.group(0, [request(i, f"text {i}") for i in range(3)])
    await rig.lookup.look_up(g)
    answers = rig.answers()
    assert {a["status"] for a in answers.values()} == {"rejected"} and len(answers) == 3
    assert {a["error"]["code"] for a in answers.values()} == {"kill_switch"}
    assert rig.model.pieces == []

    rig = Rig(inference_max_items=2)
    g = rig.group(0, [request(i, "word " * (i + 1)) for i in range(5)])
    await rig.lookup.look_up(g)

    async def switch_on() -> None:  # while the model computes the second piece
        rig.stop_reason = "runaway cost"

    rig.model.between = switch_on
    await rig.modelled.infer([g])
    assert [len(p) for p in rig.model.pieces] == [2, 2]  # the third piece never reached the model
    refused = [it for it in g.items if it.status == "rejected"]
    assert len(refused) == 1 and refused[0].error is not None and refused[0].error.code == "kill_switch"
    assert sum(it.status == "ok" for it in g.items) == 4


async def test_a_poison_input_fails_alone_and_followers_get_their_leaders_answer():
    rig = Rig()
    g = rig.group(
        0,
        [
            request(1, "fine one"),
            request(2, "poison pill"),
            request(3, "fine one"),
            request(4, "fine two words"),
            request(5, "nothing back"),
        ],
    )
    await rig.lookup.look_up(g)
    await rig.modelled.infer([g])
    answers = rig.answers()
    assert answers["r2"]["status"] == "error" and answers["r2"]["error"]["code"] == "model_error"
    assert answers["r1"]["output"] == answers["r3"]["output"] == {"embedding": [8]}
    assert answers["r3"]["cache"] == "coalesced" and answers["r3"]["cost_usd"] == 0
    assert answers["r4"]["status"] == "ok"
    assert answers["r5"]["status"] == "error" and "no output" in answers["r5"]["error"]["message"]
    # the computed pay their share by tokens of the compute: 2, 2 and 3 tokens
    costs = {k: answers[k]["cost_usd"] for k in ("r1", "r2", "r4", "r5")}
    total = 9 * 0.001 * 3.6 / 3600
    assert sum(costs.values()) == pytest.approx(total)
    assert costs["r4"] == pytest.approx(total * 3 / 9)
    assert rig.l1.get(g.items[0].serve.key_hash) is not None and len(rig.coalescer) == 0


# -- the checkpoint ---------------------------------------------------------------------
async def test_the_checkpoint_commits_only_after_results_telemetry_and_write_back():
    l2 = FakeL2(Log())
    rig = Rig(l2=l2)
    l2.log = rig.log
    rig.results.hold = acks = asyncio.Event()  # the broker has not acked any result yet
    g0 = rig.group(0, [request(1, "a b"), request(2, "c")], first_offset=10)
    g1 = rig.group(2, [request(3, "d"), None], first_offset=40)
    for g in (g0, g1):
        await rig.lookup.look_up(g)
    await rig.modelled.infer([g0, g1])
    publishing = asyncio.ensure_future(rig.checkpoint.publish(Group.merged([g0, g1])))
    await asyncio.sleep(0.01)
    assert not rig.bulk.docs(TOPICS.telemetry) and not rig.consumer.commits
    acks.set()
    await publishing
    kinds = [f"{e[0]}:{e[1] if isinstance(e[1], str) else ''}" for e in rig.log]
    last_result_ack = max(i for i, k in enumerate(kinds) if k in ("ack:t.results", "ack:t.dlq"))
    assert last_result_ack < kinds.index("send:t.telemetry")
    assert kinds.index("l2:") > max(i for i, k in enumerate(kinds) if k == "ack:t.telemetry")
    assert rig.log[-1] == ("commit", {0: 12, 2: 42}) and kinds.count("commit:") == 1
    telemetry = rig.bulk.docs(TOPICS.telemetry)
    assert sorted(t["id"] for t in telemetry) == ["r1", "r2", "r3"]  # the DLQ record has none
    for t in telemetry:
        Telemetry.model_validate(t)


async def test_a_failed_ack_stops_the_commit_and_a_refused_reply_to_is_answered_on_results():
    rig = Rig()
    rig.results.fail["t.mine"] = RuntimeError("no such topic")
    g = rig.group(0, [request(1, "a", reply_to="t.mine"), request(2, "b")])
    await rig.lookup.look_up(g)
    await rig.modelled.infer([g])
    await rig.checkpoint.publish(g)
    fallback = [d for d in rig.results.docs(TOPICS.results) if d["id"] == "r1"]
    assert fallback and fallback[0]["error"]["code"] == "reply_to_failed"
    assert rig.consumer.commits == [{0: 2}]

    rig = Rig()
    rig.results.fail[TOPICS.results] = RuntimeError("broker down")
    g = rig.group(0, [request(1, "a"), request(2, "b")])
    await rig.lookup.look_up(g)
    await rig.modelled.infer([g])
    with pytest.raises(RuntimeError, match="broker down"):
        await rig.checkpoint.publish(g)
    assert rig.consumer.commits == [] and rig.bulk.docs(TOPICS.telemetry) == []


# -- partition state ----------------------------------------------------------------------
async def test_a_revoke_drops_what_the_model_has_not_taken_and_keeps_the_counts():
    rig = Rig()
    for p in (0, 1):
        rig.intake.take_in(
            p, [Message(i, request(f"{p}-{i}", "shared text" if i == 0 else f"t{p}{i}")) for i in range(3)]
        )
    rig.intake.move_ready(1e12)
    [b0, b1] = await rig.pending.take(100, len)
    rig.state.grouped(len(b0) + len(b1))
    g = Group([b0, b1])
    await rig.lookup.look_up(g)
    rig.state.queued_for_model(g.count_misses())
    rig.model_queue.put(g)
    rig.intake.take_in(0, [Message(3, request("0-3", "late"))])
    # 6 taken; 5 misses wait for the model (the sixth follows an identical one)
    assert (rig.state.inflight_items, rig.state.awaiting_model, rig.batcher.pending()) == (6, 5, 1)
    leader = next(it for it in g.items if it.partition == 0 and it.offset == 0)
    follower = next(it for it in g.items if it.partition == 1 and it.offset == 0)
    assert follower.leader is leader
    dropped = rig.state.drop({0}, rig.batcher, rig.pending, rig.model_queue, rig.coalescer)
    assert dropped == 4 and leader.dropped
    assert (rig.state.inflight_items, rig.state.awaiting_model) == (3, 2)
    [kept] = list(rig.model_queue)
    assert {it.partition for it in kept.items} == {1}
    await rig.modelled.infer([kept])  # the follower of a dropped leader computes itself
    assert follower.cache == "miss" and rig.answers()["r1-0"]["output"] == {"embedding": [11]}


# -- supervision ------------------------------------------------------------------------
async def test_a_supervised_task_that_fails_is_logged_and_handed_to_its_owner(caplog):
    from schemas.service.tasks import supervise

    failures: list[BaseException] = []

    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("broken reader")

    async def forever() -> None:
        await asyncio.Event().wait()

    task = supervise(boom(), name="reader", on_failure=failures.append)
    quiet = supervise(forever(), name="idle", on_failure=failures.append)
    with pytest.raises(ValueError):
        await task
    await asyncio.sleep(0)
    quiet.cancel()
    await asyncio.sleep(0)
    assert [str(f) for f in failures] == ["broken reader"]  # a cancel is no failure
    assert "background task reader failed" in caplog.text


async def test_a_publisher_whose_ack_poller_died_refuses_sends_instead_of_hanging():
    from processors.publisher import Publisher, PublishError

    pub = Publisher("127.0.0.1:1", client_id="t", linger_ms=1)  # never connects: nothing is acked
    await pub.start()
    try:
        assert pub._poller is not None
        pub._poller.cancel()
        pub._poller_failed(RuntimeError("a delivery report raised"))
        with pytest.raises(PublishError, match="delivery reports stopped"):
            await pub.send("t.results", b"{}")
    finally:
        pub._producer.purge()
        await pub.stop()
