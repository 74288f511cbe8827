"""`sluice autoscale`: size the worker fleet from lag and measured service rates."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

from sluice.settings import Settings


def analytics_signals(s: Settings):
    """The analytics the autoscaler reads: a ClickHouse server, or the running
    sink's POST /query (the sink owns the embedded database; it is never
    opened from here). None when neither is configured to answer."""
    from sinks.query_endpoint import remote_runner
    from sinks.store import open_store
    from sluice.autoscale.signals import AnalyticsSignals

    if s.clickhouse_url:
        store = open_store(s.sink())
        store.start()
        return AnalyticsSignals(store.query, s.clickhouse_database)  # type: ignore[arg-type]
    return AnalyticsSignals(
        remote_runner(s.sink_host, s.sink_port, s.sink_query_token.get_secret_value(), timeout_s=10),
        s.clickhouse_database,
    )


def cmd_autoscale(s: Settings, args: argparse.Namespace) -> int:
    from sluice.autoscale.actuators import Actuator, LocalWorkers, Recommend
    from sluice.autoscale.loop import Autoscaler, serve

    cfg = s.autoscale()
    actuator: Actuator
    if args.local:
        # the workers get this process's settings, each its own metrics port
        env = {k: v for k, v in os.environ.items() if k.startswith("SLUICE_")}
        env.setdefault("SLUICE_BOOTSTRAP_SERVERS", s.bootstrap_servers)
        actuator = LocalWorkers(env, s.state_dir / "autoscale")
    else:
        actuator = Recommend()
    scaler = Autoscaler(
        cfg,
        s.kafka(),
        s.group_id,
        actuator,
        analytics_signals(s),
        instance=f"{socket.gethostname()}-{os.getpid()}",
    )
    decision = asyncio.run(serve(scaler, once=args.once))
    if args.once and decision is not None:
        print(
            f"{decision.reason}: {decision.current} -> {decision.desired} workers "
            f"(lag {decision.lag}, arrivals {decision.arrival_rps:.1f}/s, "
            f"{decision.service_rps:.1f}/s per worker {decision.service_source})"
        )
    return 0
