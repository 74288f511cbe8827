"""`sluice gateway` (the HTTP API over the Kafka request-reply) and
`sluice keys add` (an API key for a tenant)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from schemas.errors import ConfigError
from sluice.settings import Settings


def cmd_gateway(s: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from producers.gateway.app import Gateway, make_app
    from producers.gateway.keys import ApiKeys

    overrides = {k: v for k, v in (("gateway_port", args.port), ("gateway_host", args.host)) if v is not None}
    cfg = s.gateway(**overrides)
    kafka = s.kafka()
    if kafka.tenant_topics:
        raise ConfigError(
            "SLUICE_TENANT_TOPICS: the gateway holds tenants apart by API key on PREFIX.requests; "
            "run it without tenant topics"
        )
    keys = None
    if cfg.gateway_api_keys_file is not None:
        try:
            keys = ApiKeys.load(cfg.gateway_api_keys_file)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    elif not cfg.gateway_allow_anonymous:
        raise ConfigError(
            "SLUICE_GATEWAY_API_KEYS_FILE is unset: name a file of `TENANT KEY` lines (`sluice keys add TENANT`), "
            "or set SLUICE_GATEWAY_ALLOW_ANONYMOUS=true to serve every call as tenant default"
        )
    gateway = Gateway(cfg, kafka, workers_group=s.group_id, keys=keys)
    print(
        f"gateway {cfg.gateway_id} on http://{cfg.gateway_host}:{cfg.gateway_port} "
        f"({len(keys) if keys else 0} API keys{', anonymous calls allowed' if cfg.gateway_allow_anonymous else ''})",
        flush=True,
    )
    # uvloop and httptools when installed (uvicorn[standard]); one process: scale out with more instances
    uvicorn.run(
        make_app(gateway),
        host=cfg.gateway_host,
        port=cfg.gateway_port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(cfg.gateway_timeout_s) + 1,
    )
    return 0


def cmd_keys(s: Settings, args: argparse.Namespace) -> int:
    """Make a key, append its digest to the keys file, print the key (once)."""
    from producers.gateway.keys import ApiKeys, digest, new_key
    from schemas.topics import check_topic_name

    path = Path(args.file) if args.file else s.gateway().gateway_api_keys_file
    if path is None:
        raise ConfigError("SLUICE_GATEWAY_API_KEYS_FILE is unset: name the keys file (or --file)")
    try:
        check_topic_name(args.tenant)
    except ValueError as exc:
        raise ConfigError(f"tenant: {exc}") from None
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{args.tenant} sha256:{digest(key)}\n")
    ApiKeys.load(path)  # the file still parses
    print(key)
    return 0
