"""The local stack's redis-server: started with no persistence, ready once it answers PING."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from sluice.stack.config import StackConfig
from sluice.stack.processes import _Service


class RedisServer:
    """LocalStack's redis-server part (a mixin: it uses the stack's config,
    `_redis` service, `_log`, `_spawn` and `_wait_until`)."""

    if TYPE_CHECKING:  # what LocalStack provides
        config: StackConfig
        _redis: _Service
        _log: Callable[[str], None]

        def _spawn(self, svc: _Service, argv: list[str]) -> int: ...
        def _wait_until(self, svc: _Service, pid: int, ready: Callable[[float], bool], what: str) -> None: ...

    def _start_redis(self, redis_bin: str) -> int:
        svc = self._redis
        pid = self._spawn(
            svc,
            [
                redis_bin,
                "--port",
                str(self.config.redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(svc.dir),
                # A cache and a result store for a dev stack: no persistence.
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--pidfile",
                str(svc.pid_file),
                "--logfile",
                str(svc.log_file),
            ],
        )
        self._log(f"redis: started pid {pid} on 127.0.0.1:{self.config.redis_port}")
        return pid

    def _wait_redis(self, pid: int) -> None:
        def ping(timeout_s: float) -> bool:
            client = redis.Redis(
                host="127.0.0.1",
                port=self.config.redis_port,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
            )
            try:
                return bool(client.ping())
            except (redis.exceptions.RedisError, OSError):
                return False
            finally:
                client.close()

        self._wait_until(self._redis, pid, ping, "PING")
