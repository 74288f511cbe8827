"""The deployment files pass compose/validate.py, and broken copies of each
do not. A validator that is not installed fails these tests with its
install line (make setup and .ci/run install them), never a skip."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("compose_validate", ROOT / "compose" / "validate.py")
assert _spec and _spec.loader
validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of compose/ and the Dockerfile to break."""
    shutil.copytree(ROOT / "compose", tmp_path / "compose", ignore=shutil.ignore_patterns("kafka", "__pycache__"))
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_real_files_are_valid() -> None:
    assert validate.check_all(ROOT) == []


def test_interpolation_uses_defaults_and_keeps_escaped_dollars() -> None:
    assert validate.interpolate("r: ${WORKERS:-2} x: $${T} y: ${UNSET}") == "r: 2 x: ${T} y: "


def test_compose_with_an_unknown_key_is_rejected(tree: Path) -> None:
    f = tree / "compose" / "docker-compose.yml"
    edit(f, "  redis:\n    image: redis:7\n", "  redis:\n    image: redis:7\n    restart_policy: always\n")
    problems = validate.check_compose(f)
    assert any("restart_policy" in p for p in problems), problems


def test_compose_waiting_on_a_service_without_healthcheck_is_rejected(tree: Path) -> None:
    f = tree / "compose" / "docker-compose.yml"
    edit(f, "      redis:\n        condition: service_healthy", "      grafana:\n        condition: service_healthy")
    assert any("waits for grafana to be healthy, which has no healthcheck" in p for p in validate.check_compose(f))


def test_deployment_with_a_wrong_field_type_is_rejected(tree: Path) -> None:
    k8s = tree / "compose" / "k8s"
    edit(k8s / "worker.yaml", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: soon")
    problems = validate.check_k8s(k8s, tree / "compose" / "schemas" / "keda-scaledobject.json")
    assert any("sluice-worker" in p and "terminationGracePeriodSeconds" in p for p in problems), problems


def test_deployment_with_an_unknown_field_is_rejected(tree: Path) -> None:
    k8s = tree / "compose" / "k8s"
    edit(k8s / "sink.yaml", "  replicas: 1\n", "  replicas: 1\n  replica: 1\n")
    problems = validate.check_k8s(k8s, tree / "compose" / "schemas" / "keda-scaledobject.json")
    assert any("sluice-sink" in p and "replica" in p for p in problems), problems


def test_scaledobject_with_a_misspelled_field_is_rejected(tree: Path) -> None:
    k8s = tree / "compose" / "k8s"
    edit(k8s / "scaledobject.yaml", "lagThreshold: ", "lagTreshold: ")
    problems = validate.check_k8s(k8s, tree / "compose" / "schemas" / "keda-scaledobject.json")
    assert any("ScaledObject" in p and "lagTreshold" in p for p in problems), problems


def test_scaledobject_disagreeing_with_the_partitions_is_rejected(tree: Path) -> None:
    k8s = tree / "compose" / "k8s"
    edit(k8s / "scaledobject.yaml", "maxReplicaCount: 12", "maxReplicaCount: 20")
    problems = validate.check_k8s(k8s, tree / "compose" / "schemas" / "keda-scaledobject.json")
    assert any("maxReplicaCount 20 != 12" in p for p in problems), problems


def test_dashboard_naming_a_metric_nobody_exports_is_rejected(tree: Path) -> None:
    f = tree / "compose" / "grafana" / "dashboards" / "sluice.json"
    dash = json.loads(f.read_text())
    dash["panels"][0]["targets"][0]["expr"] = "sum(rate(sluice_request_total[1m]))"
    f.write_text(json.dumps(dash))
    ds = tree / "compose" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    problems = validate.check_dashboard(f, ds)
    assert any("no such metric sluice_request_total" in p for p in problems), problems


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, stage) (rate(sluice_stage_seconds_bucket{stage!="x"}[5m])))'
        " / ignoring(cache) group_left sum without (model) (sluice_requests_total offset 1h) * 60 + up"
    )
    assert validate.metric_names(expr) == {"sluice_stage_seconds_bucket", "sluice_requests_total", "up"}


def test_the_metrics_the_code_exports_include_histogram_and_counter_samples() -> None:
    names = validate.exported_metrics()
    assert {"sluice_stage_seconds_bucket", "sluice_requests_total", "sluice_cache_hits_total"} <= names
    assert {"sluice_sink_lag_records", "sluice_pending_items"} <= names
    assert "sluice_stage_seconds" not in names  # a histogram has no bare sample


def test_prometheus_config_with_a_bad_field_is_rejected(tree: Path) -> None:
    f = tree / "compose" / "prometheus" / "prometheus.yml"
    edit(f, "  scrape_interval: 10s", "  scrape_intervall: 10s")
    problems = validate.check_prometheus(f)
    assert any("scrape_intervall" in p for p in problems), problems


def test_dockerfile_running_as_root_is_rejected(tree: Path) -> None:
    f = tree / "Dockerfile"
    edit(f, "USER 10001:10001", "USER root")
    assert any("non-root" in p for p in validate.check_dockerfile(f))
