"""The local stack's redis-server: started with no persistence, ready once it answers PING.

Secure mode (SLUICE_STACK_SECURE) gives it an ACL file: the default user is
off, so a connection without a user and password can do nothing but AUTH,
and one user (`sluice`) holds the cache's rights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from sluice.stack.config import StackConfig
from sluice.stack.processes import _Service
from sluice.stack.security import StackSecrets, redis_acl, write_private

# The Redis user of Sluice's own processes; its password is in
# <state>/secrets/redis.password.
REDIS_USER = "sluice"
REDIS_PASSWORD = "redis"  # the password file's name under secrets/


class RedisServer:
    """LocalStack's redis-server part (a mixin: it uses the stack's config,
    `_redis` service, `_log`, `_spawn` and `_wait_until`)."""

    if TYPE_CHECKING:  # what LocalStack provides
        config: StackConfig
        _redis: _Service
        _log: Callable[[str], None]
        _secrets: StackSecrets

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
                *self._redis_security_args(),
            ],
        )
        self._log(f"redis: started pid {pid} on 127.0.0.1:{self.config.redis_port}")
        return pid

    def _redis_security_args(self) -> list[str]:
        """The ACL file of the secure mode (rewritten on each start: the
        password file is the truth), or nothing."""
        if not self.config.stack_secure:
            return []
        self._redis.dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(self._secrets.password(REDIS_PASSWORD).encode()).hexdigest()
        acl_file = self._redis.dir / "users.acl"
        write_private(acl_file, redis_acl(REDIS_USER, digest))
        return ["--aclfile", str(acl_file)]

    def _wait_redis(self, pid: int) -> None:
        username, password = None, None
        if self.config.stack_secure:
            # Made by _start_redis, or held by the running server's ACL.
            hint = "the running redis-server was started with it; `sluice down` and up again makes a new one"
            username, password = REDIS_USER, self._secrets.password(REDIS_PASSWORD, create=False, hint=hint)

        def ping(timeout_s: float) -> bool:
            client = redis.Redis(
                host="127.0.0.1",
                port=self.config.redis_port,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                username=username,
                password=password,
            )
            try:
                return bool(client.ping())
            except (redis.exceptions.RedisError, OSError):
                return False
            finally:
                client.close()

        self._wait_until(self._redis, pid, ping, "PING")
