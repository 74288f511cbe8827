"""`sluice admission` and `sluice tenants`: the admission stage, and the limits it enforces."""

from __future__ import annotations

import argparse
import asyncio
import time
import tomllib
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError
from sluice.settings import Settings


def cmd_admission(s: Settings, args: argparse.Namespace) -> int:
    from processors.admission.stage import serve

    asyncio.run(serve(s.admission_stage()))
    return 0


def _limits_doc(args: argparse.Namespace) -> dict[str, Any]:
    doc = {
        "requests_per_minute": args.rpm,
        "tokens_per_minute": args.tpm,
        "daily_usd": args.daily_usd,
        "monthly_usd": args.monthly_usd,
    }
    return {k: v for k, v in doc.items() if v is not None}


def limits_from_file(path: Path) -> dict[str, Any]:
    """A TOML file -> control records: [default], [global], [tenants.NAME]."""
    from processors.admission.control import TENANT_PREFIX
    from processors.admission.limits import GlobalLimits, TenantLimits

    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    records: dict[str, Any] = {}
    try:
        if "default" in doc:
            records["default"] = TenantLimits.model_validate(doc["default"]).model_dump(exclude_none=True)
        if "global" in doc:
            records["global"] = GlobalLimits.model_validate(doc["global"]).model_dump(exclude_none=True)
        for name, limits in dict(doc.get("tenants", {})).items():
            records[TENANT_PREFIX + name] = TenantLimits.model_validate(limits).model_dump(exclude_none=True)
    except ValueError as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}: {str(exc).splitlines()[1:3]}") from None
    unknown = set(doc) - {"default", "global", "tenants"}
    if unknown:
        raise ConfigError(f"{path}: unknown tables {sorted(unknown)} (expected default, global, tenants.NAME)")
    return records


def cmd_tenants(s: Settings, args: argparse.Namespace) -> int:
    from processors.admission.control import TENANT_PREFIX, kill_switch_doc, write_control

    topic = s.topics.control
    action = args.tenants_command or "show"
    if action == "show":
        print(asyncio.run(_show(s)))
        return 0
    if action == "set":
        records: dict[str, Any] = {TENANT_PREFIX + args.name: _limits_doc(args)}
    elif action == "unset":
        records = {TENANT_PREFIX + args.name: None}
    elif action == "default":
        records = {"default": _limits_doc(args)}
    elif action == "global":
        records = {
            "global": {
                k: v for k, v in (("daily_usd", args.daily_usd), ("monthly_usd", args.monthly_usd)) if v is not None
            }
        }
    elif action == "kill-switch":
        records = {"kill_switch": kill_switch_doc(args.state == "on", args.reason or "")}
    elif action == "load":
        records = limits_from_file(Path(args.file))
    elif action == "grant":
        return _grant(s, args)
    else:  # argparse allows nothing else
        raise ConfigError(f"sluice tenants {action}: unknown")
    asyncio.run(write_control(s.kafka(), topic, records))
    for key, doc in records.items():
        print(f"{key}: {'removed' if doc is None else doc}")
    return 0


def _grant(s: Settings, args: argparse.Namespace) -> int:
    """A tenant of tenant-topic mode: its SCRAM user, its two topics, its ACLs."""
    import secrets

    from sluice import access
    from sluice.stack.security import write_private

    path = Path(args.password_file)
    if path.exists():
        lines = path.read_text().splitlines()
        password = lines[0] if lines else ""
        if not password:
            raise ConfigError(f"--password-file {path}: empty")
    else:
        password = secrets.token_urlsafe(32)
        write_private(path, password + "\n")
    admin = s.kafka()
    access.create_user(admin, args.name, password, mechanism=admin.kafka_sasl_mechanism)
    bindings = access.grant_tenant(
        admin,
        s.topic_prefix,
        args.name,
        requests_partitions=args.partitions,
        results_partitions=args.partitions,
        replication_factor=s.topic_replication_factor,
    )
    requests, results = access.tenant_topics(s.topic_prefix, args.name)
    print(f"tenant {args.name}: Kafka user {args.name} (password in {path}); writes {requests}, reads {results}")
    print(f"{len(bindings)} ACLs granted; its clients set SLUICE_TENANT_TOPICS=true SLUICE_TENANT={args.name}")
    return 0


def _fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:g}{unit}"


async def _show(s: Settings) -> str:
    """Limits, today's and this month's use (spent + reserved) and what is left, per tenant."""
    from processors.admission.control import ControlView
    from processors.admission.limits import day_of, month_of
    from processors.admission.stage import StateView
    from schemas.records import now_ms

    control = ControlView(s.kafka(), s.topics.control)
    states = StateView(s.kafka(), s.topics.admission_state)
    await control.start()
    await states.start()
    try:
        await states.caught_up_to_now(list(range(1 << 16)))
    finally:
        await control.stop()
        await states.stop()
    c = control.control
    at = now_ms()
    day, month = day_of(at), month_of(at)
    used: dict[str, list[float]] = {}
    for (_, tenant), doc in states.latest.items():
        held = sum(v[0] for v in doc.get("reserved", {}).values())
        today = (doc.get("spent_day_usd", 0.0) if doc.get("day") == day else 0.0) + held
        this_month = (doc.get("spent_month_usd", 0.0) if doc.get("month") == month else 0.0) + held
        u = used.setdefault(tenant, [0.0, 0.0])
        u[0] += today
        u[1] += this_month
    rows = [
        (
            "tenant",
            "req/min",
            "tokens/min",
            "daily USD",
            "used today",
            "left today",
            "monthly USD",
            "used month",
            "left month",
        )
    ]
    for tenant in sorted(set(c.tenants) | set(used)):
        lim = c.limits_of(tenant)
        today, this_month = used.get(tenant, [0.0, 0.0])
        rows.append(
            (
                tenant + ("" if tenant in c.tenants else " (default)"),
                _fmt(lim.requests_per_minute),
                _fmt(lim.tokens_per_minute),
                _fmt(lim.daily_usd),
                f"{today:.6g}",
                _fmt(None if lim.daily_usd is None else max(0.0, lim.daily_usd - today)),
                _fmt(lim.monthly_usd),
                f"{this_month:.6g}",
                _fmt(None if lim.monthly_usd is None else max(0.0, lim.monthly_usd - this_month)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    g = c.global_limits
    total_day = sum(u[0] for u in used.values())
    total_month = sum(u[1] for u in used.values())
    lines.append("")
    lines.append(
        f"all tenants: today {total_day:.6g} of {_fmt(g.daily_usd)} USD, this month {total_month:.6g} of {_fmt(g.monthly_usd)} USD"
    )
    d = c.default
    lines.append(
        f"default limits: {_fmt(d.requests_per_minute)} req/min, {_fmt(d.tokens_per_minute)} tokens/min, "
        f"{_fmt(d.daily_usd)} USD a day, {_fmt(d.monthly_usd)} USD a month"
    )
    ks = c.kill_switch
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ks.at_ms / 1000)) if ks.at_ms else ""
    lines.append(
        f"kill switch: {'ON' if ks.on else 'off'}"
        + (f" since {since} UTC" if since else "")
        + (f" ({ks.reason})" if ks.reason else "")
    )
    return "\n".join(lines)
