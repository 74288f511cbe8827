"""Worker processes on this machine: start, wait until ready, stop.

The local actuator of the control plane (the demo, benchmarks and tests run
workers through it too): each worker is a real `sluice worker` process, and
ready means its /readyz answers 200 (model loaded, partitions assigned).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from schemas.errors import SluiceError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_PORT_SETTING = {
    "worker": "SLUICE_METRICS_PORT",
    "sink": "SLUICE_SINK_PORT",
    "autoscale": "SLUICE_AUTOSCALE_PORT",
    "admission": "SLUICE_ADMISSION_PORT",
    "gateway": "SLUICE_GATEWAY_PORT",
}


class WorkerProcess:
    """A `sluice worker` process (or `sluice sink`, `sluice autoscale ARGS` with `command`)."""

    def __init__(
        self,
        settings: dict[str, str],
        *,
        log_path: Path | None = None,
        cwd: Path | None = None,
        inherit_env: bool = True,
        command: str = "worker",
        args: tuple[str, ...] = (),
    ) -> None:
        self.command = command
        self.args = args
        port_setting = _PORT_SETTING[command]
        self.port = int(settings.get(port_setting) or 0) or free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")} if inherit_env else {}
        self.env = {**base, **settings, port_setting: str(self.port)}
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def start(self, ready_timeout_s: float = 120.0) -> float:
        """Start and wait for /readyz; return the seconds it took."""
        out = None
        if self.log_path is not None:
            self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
            out = self._log
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sluice", self.command, *self.args],
            env=self.env,
            cwd=self.cwd,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
        while time.monotonic() - t0 < ready_timeout_s:
            if self.proc.poll() is not None:
                raise SluiceError(
                    f"{self.command} exited with code {self.proc.returncode} before it was ready"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if self.ready():
                return time.monotonic() - t0
            time.sleep(0.1)
        self.stop()
        raise SluiceError(f"{self.command} not ready after {ready_timeout_s:.0f} s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200 and self.proc is not None and self.proc.poll() is None
        except OSError:
            return False

    def model_pid(self) -> int:
        """The worker's model process: its one child that is not
        multiprocessing's resource tracker (Linux: read from /proc)."""
        assert self.proc is not None
        pid = self.proc.pid
        kids = [int(k) for task in Path(f"/proc/{pid}/task").iterdir() for k in (task / "children").read_text().split()]
        found = [k for k in kids if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]
        if len(found) != 1:
            raise SluiceError(f"{self.command} {pid}: {len(found)} model processes among its children {kids}")
        return found[0]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def scrape(self) -> dict[str, float]:
        """Metric samples by their full name (with labels)."""
        out: dict[str, float] = {}
        for line in self.metrics().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the worker drains and commits), SIGKILL past the timeout."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
