"""The Grafana dashboard and the Prometheus exposition, checked against a
running worker: what the dashboard asks for is what a real scrape offers,
and promtool accepts the exposition as Prometheus would read it."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess

import pytest

from producers.corpus import text
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "sluice.json"
# compose/ is deployment files, not a package: load its checker by path
_spec = importlib.util.spec_from_file_location("compose_validate", ROOT / "compose" / "validate.py")
assert _spec is not None and _spec.loader is not None
validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate)
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def scraped_names(exposition: str) -> set[str]:
    """Every sample name the exposition has, and each family's own name."""
    names = set(re.findall(r"^# TYPE (\S+) ", exposition, re.MULTILINE))
    names |= {
        line.split("{", 1)[0].split(" ", 1)[0] for line in exposition.splitlines() if line and not line.startswith("#")
    }
    return names


async def test_the_dashboard_names_only_metrics_a_running_worker_exports(worker_factory, client):
    w = worker_factory()
    await client.submit_many([text(i, seed=31) for i in range(20)])  # misses, then hits
    await client.submit_many([text(i, seed=31) for i in range(20)])
    bad = await client.send({"v": 1, "id": "bad-model", "input": "x", "model": "no-such-model"})
    assert (await bad)["status"] == "error"
    exposition = w.metrics()
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: apt-get install prometheus (make system-deps and .ci/run do)"
    lint = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    scraped = scraped_names(exposition)
    asked: set[str] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets") or []:
            asked |= validate.metric_names(target.get("expr", ""))
    worker_side = {
        n
        for n in asked
        if n.startswith("sluice_") and not n.startswith(("sluice_sink_", "sluice_autoscale_", "sluice_admission_"))
    }
    assert worker_side, "the dashboard asks the workers for nothing"
    missing = sorted(n for n in worker_side if n not in scraped)
    assert not missing, f"the dashboard asks for {missing}, which a running worker does not export"
