"""Time slices (processors/scheduling.py): asked for, inherited, given back."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from processors.model_process import ModelProcess
from processors.runtime import BUILTIN_MODELS
from processors.scheduling import get_slice_us, set_slice_us, slices_supported

# older kernels take the call and ignore the slice; there is nothing to test
pytestmark = pytest.mark.skipif(not slices_supported(), reason="the kernel keeps no custom time slice (Linux < 6.12)")


def _in_fresh_thread(fn):
    """Run fn on a thread of its own, so this process's threads keep theirs."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def _kernel_default_us() -> float:
    def read() -> float:
        set_slice_us(0)
        return get_slice_us()

    return _in_fresh_thread(read)


def test_a_thread_gets_the_slice_it_asks_for_and_the_threads_it_makes_inherit_it():
    default = _kernel_default_us()
    assert default != 250

    def ask() -> tuple[float, float, float]:
        set_slice_us(250)
        mine = get_slice_us()
        seen: list[float] = []
        child = threading.Thread(target=lambda: seen.append(get_slice_us()))
        child.start()
        child.join()
        set_slice_us(0)
        return mine, seen[0], get_slice_us()

    mine, inherited, back = _in_fresh_thread(ask)
    assert (mine, inherited, back) == (250, 250, default)


def test_the_model_process_gives_the_short_slice_back():
    """Spawned from a thread with a short slice (as the worker's are), the
    model process runs with the kernel's default: its compute is what the
    worker's threads preempt."""
    default = _kernel_default_us()

    def spawn() -> list[float]:
        set_slice_us(200)

        async def run() -> list[float]:
            mp = ModelProcess()
            try:
                await mp.load(
                    {"all-minilm-l6-v2": BUILTIN_MODELS / "all-minilm-l6-v2"},
                    dict(intra_op_threads=2, token_budget=64, max_items=4),
                )
                import os

                return [get_slice_us(int(t)) for t in os.listdir(f"/proc/{mp.pid}/task")]
            finally:
                mp.close()

        return asyncio.run(run())

    slices = _in_fresh_thread(spawn)
    assert len(slices) >= 2 and set(slices) == {default}
