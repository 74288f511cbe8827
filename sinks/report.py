"""`sluice report`: one self-contained HTML page of plots and tables, made
from the named queries (latency percentiles, throughput, cache hit rate and
cost over time; cost per tenant; work per worker)."""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from schemas.errors import require_extra
from sinks.analytics import Runner, format_result, load_queries, run


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; MissingExtra with the install
    hint when matplotlib (the `report` extra) is not installed."""
    matplotlib = require_extra("matplotlib", "report", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _dt(v: Any) -> datetime:
    return v if isinstance(v, datetime) else datetime.strptime(str(v), "%Y-%m-%d %H:%M:%S")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _rows(cols: list[str], rows: list[Sequence[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(cols, r)) for r in rows]


def build_report(runner: Runner, *, db: str = "sluice", since_s: int = 3600, slo_ms: float = 500.0) -> str:
    plt = pyplot()

    latency = _rows(*run("latency_by_model_minute", runner, db=db, since_s=since_s))
    traffic = _rows(*run("traffic_by_minute", runner, db=db, since_s=since_s))
    figures: list[tuple[str, str]] = []

    fig, ax = plt.subplots(figsize=(9, 3.2))
    for model in sorted({r["model"] for r in latency}):
        pts = [r for r in latency if r["model"] == model]
        xs = [_dt(r["minute"]) for r in pts]
        for q, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            ax.plot(xs, [r[q] for r in pts], style, label=f"{model} {q[:3]}")
    ax.axhline(slo_ms, color="grey", lw=0.8)
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    figures.append(("Latency percentiles per minute (line: SLO)", _png(fig)))
    plt.close(fig)

    xs = [_dt(r["minute"]) for r in traffic]
    for key, label in (
        ("requests_per_s", "requests/s"),
        ("hit_rate", "cache hit rate"),
        ("cost_usd", "cost per minute, USD"),
    ):
        fig, ax = plt.subplots(figsize=(9, 2.6))
        ax.plot(xs, [r[key] for r in traffic], "-o", ms=3)
        ax.set_ylabel(label)
        if key == "hit_rate":
            ax.set_ylim(0, 1)
        figures.append((label.capitalize() + " over time", _png(fig)))
        plt.close(fig)

    tables = []
    for name in ("cost_by_tenant_day", "cache_hit_rate", "worker_throughput", "slo_violations"):
        cols, rows = run(name, runner, db=db, since_s=since_s, slo_ms=slo_ms)
        tables.append((name, load_queries()[name].answers, format_result(cols, rows)))

    parts = [
        "<!doctype html><meta charset='utf-8'><title>Sluice report</title>",
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}"
        "pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:12px}</style>",
        f"<h1>Sluice report</h1><p>Last {since_s // 60} minutes, made "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>",
    ]
    for title, png in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{png}'>")
    for name, answers, text in tables:
        parts.append(f"<h2><code>{name}</code></h2><p>{html.escape(answers)}</p><pre>{html.escape(text)}</pre>")
    return "\n".join(parts)


def write_report(path: Path, runner: Runner, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(runner, **kw))
    return path
