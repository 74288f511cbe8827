"""Shared plumbing of the benchmarks: the local stack, a worker process with
its own topics, and the machine's description. Benchmarks use the real
stack and the real model; nothing here is imported by the product."""

from __future__ import annotations

import asyncio
import os
import platform
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from sluice.supervisor import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"  # raw outputs, git-ignored
PLOTS = ROOT / "bench" / "plots"  # committed with RESULTS.md


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import onnxruntime

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}"
    )


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) a process has used so far; this one by default."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """CPU time the hypervisor has given this VM's cores to others so far
    (/proc/stat `steal`, all cores). On a shared cloud VM it comes in
    stretches; a run in one has fewer cores than it thinks, and its tail
    latencies say more about the neighbours than about us."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def broker_pid() -> int | None:
    """The local stack's running broker (benchmarks count its CPU time)."""
    from sluice.settings import load_settings
    from sluice.stack import LocalStack

    return LocalStack(load_settings().stack()).broker_pid()


@contextmanager
def stack() -> Iterator[tuple[str, str]]:
    """The local stack (started if needed, stopped after if we started it)."""
    from sluice.settings import load_settings
    from sluice.stack import LocalStack

    s = load_settings()
    local = LocalStack(s.stack())
    outcome = local.up(s.topic_partitions(), per_topic=s.topics.configs())
    # this process is the load generator, as in `sluice loadtest`
    from sluice.cli import generator_slice

    generator_slice(s)
    try:
        yield local.bootstrap_servers, local.redis_url
    finally:
        # every bench makes its own topics (new_prefix): drop them, or a
        # long-lived local broker gathers thousands of partitions, whose heap
        # makes its GC pauses longer and more frequent (measured: 6,000
        # partitions left 54 MB of a 512 MB heap to the young generation)
        from sluice.admin import delete_topics_with_prefix

        try:
            # on a thread of its own: `make bench` enters this from inside
            # its event loop, where asyncio.run() refuses to start
            with ThreadPoolExecutor(1) as pool:
                gone = pool.submit(
                    lambda: asyncio.run(delete_topics_with_prefix(local.bootstrap_servers, BENCH_TOPIC_PREFIX))
                ).result()
            print(f"deleted {len(gone)} bench topics", flush=True)
        except Exception as exc:
            print(f"bench topics left on the broker: {exc}", flush=True)
        if outcome == "started":
            local.down()


BENCH_TOPIC_PREFIX = "bench-"


def new_prefix(name: str) -> str:
    return f"{BENCH_TOPIC_PREFIX}{name}-{uuid.uuid4().hex[:6]}"


async def create_topics_async(
    bootstrap: str, prefix: str, partitions: int = 12, results: int | None = None, config: dict[str, str] | None = None
) -> None:
    from schemas.topics import Topics
    from sluice.admin import ensure_topics

    topics = Topics(prefix)
    await ensure_topics(
        bootstrap,
        topics.partitions(requests=partitions, results=results or partitions),
        configs=config,
        per_topic=topics.configs(),
    )


def create_topics(
    bootstrap: str, prefix: str, partitions: int = 12, config: dict[str, str] | None = None, results: int | None = None
) -> None:
    """The prefix's topics (`results` partitions of results, else as many
    as of requests), with topic configs (e.g. segment.index.bytes)."""
    asyncio.run(create_topics_async(bootstrap, prefix, partitions, results, config))


@contextmanager
def worker(bootstrap: str, prefix: str, **settings: str) -> Iterator[WorkerProcess]:
    """`sluice worker` on its own topics, ready; stopped afterwards."""
    w = WorkerProcess(
        {
            "SLUICE_BOOTSTRAP_SERVERS": bootstrap,
            "SLUICE_TOPIC_PREFIX": prefix,
            "SLUICE_GROUP_ID": f"{prefix}-workers",
            **settings,
        },
        log_path=OUT / f"worker-{prefix}.log",
        cwd=ROOT,
    )
    w.ready_s = w.start()  # type: ignore[attr-defined]
    try:
        yield w
    finally:
        w.stop()


LEVEL_COLOURS = {"l1": "tab:green", "l2": "tab:olive", "coalesced": "tab:blue", "miss": "tab:red"}


def scatter_by_level(ax, samples: list[tuple[float, float, str]]) -> None:
    """Latency against scheduled send time, a colour per cache level, log scale."""
    for level, colour in LEVEL_COLOURS.items():
        pts = [(t, lat) for t, lat, lv in samples if lv == level]
        if pts:
            ax.scatter(*zip(*pts), s=2, c=colour, label=f"{level} ({len(pts)})", alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("scheduled send time, s")
    ax.legend(markerscale=4, fontsize=8)
