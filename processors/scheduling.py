"""The CPU scheduler's time slice of our threads (Linux 6.12+, EEVDF).

When cores are short, a thread that wakes (a fetch answered, a request
arrived) waits for whatever runs on the core to reach the end of its slice:
1.4 ms by default here. A hit crosses a dozen such wake-ups (the client's
producer, the broker's network and handler threads, the worker's consumer
thread and event loop, the way back), so on a busy machine the model's
compute, taking a core for seconds during a miss backlog, adds that wait a
dozen times over. A thread asking for a short slice gets an earlier
deadline, and the kernel lets it preempt on wake-up. Its share of the CPU
(its weight, its niceness) does not change: it runs sooner, not more.

`sched_setattr` has no wrapper in Python's `os` module nor in psutil, so it
is called through ctypes. Kernels before 6.12 take the call and ignore the
slice; elsewhere (other systems, a sandbox refusing the call) it fails and
says why, and nothing else changes.

A short slice decides who runs first; a process's weight decides who gets
the core when several want it. Niceness sets a thread's weight against the
threads of its own scheduling group only, and on Linux with autogroups (the
default of most distributions) a group is a session: the worker, the
broker and a client each started from a shell are three groups of equal
weight. A model process niced inside the worker's session yields to the
worker's threads, but not to the broker's or the clients' that carry the
same hits. `group_problem` gives the model process a session of its own, so
its compute no longer weighs inside the worker's group, and sets the nice
of that group, so that a niceness above 0 yields to every other group.
Where there are no autogroups (a container's or a service's cgroup) the
thread niceness alone applies, against the rest of that cgroup.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
from collections.abc import Callable

from schemas.errors import SluiceError

# sched_setattr / sched_getattr: not in glibc's headers by name before 2.41
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}


class _SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


class SchedulingError(SluiceError, OSError):
    """The slice could not be read or set (not Linux, or refused). Still an
    OSError, for callers that catch the system call's failures."""

    code = "scheduling"


def _calls() -> tuple[ctypes.CDLL, int, int]:
    numbers = _SYSCALLS.get(platform.machine()) if sys.platform == "linux" else None
    if numbers is None:
        raise SchedulingError(f"time slices are not settable on {sys.platform}/{platform.machine()}")
    return ctypes.CDLL(None, use_errno=True), *numbers


def _get(tid: int) -> _SchedAttr:
    libc, _, getattr_ = _calls()
    attr = _SchedAttr()
    if libc.syscall(getattr_, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        raise SchedulingError(f"sched_getattr({tid}): {os.strerror(ctypes.get_errno())}")
    return attr


def get_slice_us(tid: int = 0) -> float:
    """The slice of a thread (0: the calling one), µs."""
    return _get(tid).sched_runtime / 1000


def set_slice_us(slice_us: int, tid: int = 0) -> None:
    """Ask for a slice of `slice_us` for one thread (0: the calling one); 0
    goes back to the kernel's default. Threads it creates later inherit it."""
    libc, setattr_, _ = _calls()
    attr = _get(tid)  # keep the policy and niceness as they are
    attr.size, attr.sched_flags, attr.sched_runtime = ctypes.sizeof(attr), 0, slice_us * 1000
    if libc.syscall(setattr_, tid, ctypes.byref(attr), 0) != 0:
        raise SchedulingError(f"sched_setattr({tid}, slice {slice_us} µs): {os.strerror(ctypes.get_errno())}")


def slices_supported() -> bool:
    """Whether this kernel keeps a slice asked for (Linux 6.12+): tried on a
    thread of its own, so no thread of the caller's changes."""
    seen: list[float] = []

    def probe() -> None:
        try:
            set_slice_us(250)
            seen.append(get_slice_us())
        except SchedulingError:
            pass

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return seen == [250]


def _each_thread(pid: int | None, fn: Callable[[int], None]) -> None:
    """fn(tid) for every thread of a process (None: this one)."""
    task = f"/proc/{pid or 'self'}/task"
    for tid in os.listdir(task):
        try:
            fn(int(tid))
        except OSError:
            if os.path.exists(f"{task}/{tid}"):
                raise  # a thread that ended meanwhile is no failure


def set_process_slice_us(slice_us: int, pid: int | None = None) -> None:
    """Every thread of a process (default: this one). Threads created later
    inherit their creator's slice, so they follow."""
    _each_thread(pid, lambda tid: set_slice_us(slice_us, tid))


def slice_problem(slice_us: int, pid: int | None = None) -> str | None:
    """Set a process's slice; None when done, else why not (to log)."""
    try:
        set_process_slice_us(slice_us, pid)
    except (SchedulingError, OSError) as exc:
        return str(exc)
    return None


def group_problem(nice: int) -> str | None:
    """Put this process in a scheduling group of its own (a new session,
    hence a new autogroup) at `nice`, its threads too; None when done, else
    why not (to log). Threads made later inherit the niceness of the
    thread that makes them."""
    try:
        os.setsid()

        def lower(tid: int) -> None:  # never above the priority it inherited
            os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))

        # every thread: some library may have made one already (OpenBLAS at import)
        _each_thread(None, lower)
    except OSError as exc:
        return f"niceness {nice}: {exc}"
    try:
        with open("/proc/self/autogroup", "w") as f:  # absent without CONFIG_SCHED_AUTOGROUP
            f.write(str(nice))
    except FileNotFoundError:
        pass
    except OSError as exc:
        return f"autogroup niceness {nice}: {exc}"
    return None
