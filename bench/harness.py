"""Shared plumbing of the benchmarks: the local stack, a worker process with
its own topics, and the machine's description. Benchmarks use the real
stack and the real model; nothing here is imported by the product."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import onnxruntime
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def stack() -> Iterator[tuple[str, str]]:
    """The local stack (started if needed, stopped after if we started it)."""
    from sluice.settings import load_settings
    from sluice.stack import LocalStack
    s = load_settings()
    local = LocalStack(s.stack())
    outcome = local.up(s.topic_partitions())
    try:
        yield local.bootstrap_servers, local.redis_url
    finally:
        if outcome == "started":
            local.down()


def new_prefix(name: str) -> str:
    return f"bench-{name}-{uuid.uuid4().hex[:6]}"


def create_topics(bootstrap: str, prefix: str, partitions: int = 12) -> None:
    from schemas.topics import Topics
    from sluice.admin import ensure_topics
    asyncio.run(ensure_topics(bootstrap, Topics(prefix).partitions(requests=partitions)))


@contextmanager
def worker(bootstrap: str, prefix: str, **settings: str) -> Iterator[int]:
    """`sluice worker` on its own topics; yields its metrics port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(SLUICE_BOOTSTRAP_SERVERS=bootstrap, SLUICE_TOPIC_PREFIX=prefix,
               SLUICE_GROUP_ID=f"{prefix}-workers", SLUICE_METRICS_PORT=str(port), **settings)
    log = open(OUT / f"worker-{prefix}.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "sluice", "worker"], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 120:
                raise RuntimeError("worker not ready in 120 s")
            time.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def scrape(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
    return out
