"""The model process answers exactly what the runtime computes in-process."""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest

from processors.model_process import Job, ModelProcess, ModelProcessError
from processors.runtime import BUILTIN_MODELS, ModelRuntime
from schemas.records import encode
from tests.conftest import AUTOGROUPS, autogroup

OPTIONS = dict(intra_op_threads=1, token_budget=64, max_items=4)


def test_outputs_tokens_and_costs_match_the_runtime_in_this_process():
    texts = ["short", "a somewhat longer sentence about kafka partitions and batches " * 40, "x"]
    labels = ("sport", "finance")
    jobs = [Job("all-minilm-l6-v2", t) for t in texts] + [
        Job("all-minilm-l6-v2", "the match ended 2-1", "classify", labels)
    ]

    async def run():
        mp = ModelProcess(nice=3)
        try:
            providers = await mp.load({"all-minilm-l6-v2": BUILTIN_MODELS / "all-minilm-l6-v2"}, OPTIONS)
            return providers, await mp.compute(jobs), mp.pid
        finally:
            mp.close()

    providers, computed, pid = asyncio.run(run())
    assert providers == {"all-minilm-l6-v2": ["CPUExecutionProvider"]} and pid != os.getpid()

    here = ModelRuntime(BUILTIN_MODELS / "all-minilm-l6-v2", **OPTIONS).load()
    encoded = here.encode(texts)
    vectors = here.embed_encoded(encoded)
    for o, enc, vec in zip(computed.outcomes, encoded, vectors):
        assert o.error is None and o.out == encode({"embedding": vec})  # byte for byte
        assert (o.tokens, o.truncated) == (enc.tokens, enc.truncated)
    assert computed.outcomes[1].truncated and computed.outcomes[1].tokens == here.card.max_tokens
    scores = orjson.loads(computed.outcomes[3].out)
    assert set(scores["scores"]) == set(labels) and scores["label"] in labels
    run = computed.runs["all-minilm-l6-v2"]
    assert run.sub_batches >= 2 and run.padded_tokens >= sum(o.tokens for o in computed.outcomes[:3])
    assert run.seconds > 0 and run.end_ms >= run.start_ms


def test_pieces_come_back_one_by_one_in_order_with_the_answers_of_one_call():
    """Each piece is its own computation (its own run and timings), yielded
    in the order given, and answers exactly as computing all at once does."""
    texts = [f"piece test sentence number {i} about partitions" for i in range(7)]
    pieces = [[Job("all-minilm-l6-v2", t) for t in texts[:3]], [Job("all-minilm-l6-v2", t) for t in texts[3:]]]

    async def run():
        mp = ModelProcess()
        try:
            await mp.load({"all-minilm-l6-v2": BUILTIN_MODELS / "all-minilm-l6-v2"}, OPTIONS)
            each = [c async for c in mp.compute_pieces(pieces)]
            return each, await mp.compute([j for p in pieces for j in p])
        finally:
            mp.close()

    each, whole = asyncio.run(run())
    assert [len(c.outcomes) for c in each] == [3, 4]
    assert [o.out for c in each for o in c.outcomes] == [o.out for o in whole.outcomes]
    first, second = (c.runs["all-minilm-l6-v2"] for c in each)
    assert first.end_ms <= second.start_ms  # one after the other, not one run for both


def test_a_dead_model_process_fails_the_pieces_with_a_clear_error():
    async def run():
        mp = ModelProcess()
        try:
            await mp.load({"all-minilm-l6-v2": BUILTIN_MODELS / "all-minilm-l6-v2"}, OPTIONS)
            os.kill(mp.pid, 9)
            with pytest.raises(ModelProcessError, match="the model process died"):
                async for _ in mp.compute_pieces([[Job("all-minilm-l6-v2", "x")]] * 3):
                    pass
            # the pool now knows: it refuses the next hand-off as it is
            # queued, which must read the same (CI once saw the raw error)
            with pytest.raises(ModelProcessError, match="the model process died"):
                async for _ in mp.compute_pieces([[Job("all-minilm-l6-v2", "x")]]):
                    pass
            with pytest.raises(ModelProcessError, match="the model process died"):
                await mp.compute([Job("all-minilm-l6-v2", "x")])
        finally:
            mp.close()

    asyncio.run(run())


@pytest.mark.parametrize("nice", [0, 3])
def test_the_model_process_runs_in_a_scheduling_group_of_its_own_at_its_niceness(nice):
    """Its own session (so its own autogroup, out of the worker's) at the
    niceness asked for, every thread of it: above 0 it yields to every
    other process on the machine."""

    async def run():
        mp = ModelProcess(nice=nice)
        try:
            await mp.load({"all-minilm-l6-v2": BUILTIN_MODELS / "all-minilm-l6-v2"}, dict(OPTIONS, intra_op_threads=2))
            pid = mp.pid
            nices = [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")]
            return pid, os.getsid(pid), nices, autogroup(pid)
        finally:
            mp.close()

    pid, sid, nices, group = asyncio.run(run())
    assert sid == pid != os.getsid(0)
    assert len(nices) >= 2 and set(nices) == {nice}
    # ours may be the root group (None: no session was ever made above us, as
    # under a CI runner); the model's never is
    assert group is not None and group[1] == nice or not AUTOGROUPS, group
    assert autogroup() is None or autogroup()[0] != group[0], autogroup()
