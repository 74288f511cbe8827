"""The worker and the local stack run with short time slices; the model
process with the kernel's default (processors/scheduling.py says why)."""

from __future__ import annotations

import os

import pytest

from processors.scheduling import get_slice_us, slices_supported

pytestmark = pytest.mark.skipif(not slices_supported(), reason="the kernel keeps no custom time slice (Linux < 6.12)")


def _slices(pid: int) -> set[float]:
    return {get_slice_us(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


async def test_worker_threads_take_the_setting_and_its_model_process_the_default(stack, worker_factory):
    w = worker_factory(SLUICE_SCHED_SLICE_US="300")
    assert w.proc is not None
    worker_slices, model_slices = _slices(w.proc.pid), _slices(w.model_pid())
    # every thread: librdkafka's, the consumer's, the executor's, the loop
    assert worker_slices == {300}, worker_slices
    assert 300 not in model_slices and len(model_slices) == 1, model_slices
    if stack.local is not None:  # the session's own stack: its broker and redis
        for pid in (stack.local.broker_pid(), stack.local.redis_pid()):
            assert _slices(pid) == {100}
