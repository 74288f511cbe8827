"""Processes of the local stack: which is ours and alive, ports, log tails."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import socket
import subprocess
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

_LOG_TAIL_LINES = 20

T = TypeVar("T")

# Popen objects of the processes this interpreter started, by pid. Holding them
# lets us reap our own children: a killed child stays a zombie until waited
# for, and os.kill(pid, 0) succeeds on zombies, so down() in the same process
# that ran up() (tests, fixtures) would otherwise wait its full grace period.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class _Service:
    name: str
    dir: Path
    pid_file: Path
    log_file: Path
    # Substring of the process's command line; tells our process from an
    # unrelated one that got the same pid after ours died.
    marker: str
    # (port, setting) pairs the service binds.
    ports: tuple[tuple[int, str], ...]


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # asyncio.run refuses to nest; a private thread gets its own loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _pid_alive(pid: int, marker: str) -> bool:
    """True when `pid` is a live (non-zombie) process whose command line has `marker`."""
    child = _CHILDREN.get(pid)
    if child is not None:
        # Our own child: poll() is exact (its pid cannot be reused before we
        # reap it), and going on to /proc could see it die in between and
        # leave it unreaped.
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the pid was reused, ours is gone
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return False  # exited between the kill and the read
    except OSError:
        return True  # no /proc (not Linux): os.kill is all we can go by
    # The state follows the parenthesised command name, which may hold spaces.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and marker in cmdline


def _port_answers(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR so that a TIME_WAIT left by our last run does not count
        # as "in use"; the services set it too and would bind fine.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def _rotate(log_file: Path) -> None:
    """Keep the previous run's log as .1, so a failure's tail shows only this run."""
    if log_file.exists():
        log_file.replace(log_file.with_name(log_file.name + ".1"))
