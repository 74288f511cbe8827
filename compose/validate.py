#!/usr/bin/env python3
"""Static checks of the deployment files, for CI machines without a Docker
engine or a cluster:

    python compose/validate.py        # exit 1 and one line per problem

- compose/docker-compose.yml against the Compose specification's JSON
  schema (the copy check-jsonschema ships), after `${VAR:-default}`
  interpolation as `docker compose config` does it; every depends_on names a
  service, a `service_healthy` one has a health check, bind mounts exist.
- compose/k8s/: every object with kubernetes-validate (strict: an unknown
  field fails), the ScaledObject against compose/schemas/keda-scaledobject.json,
  and the numbers that must agree across files (servers, group, topic,
  max replicas = partitions, grace period > drain timeout).
- the Grafana dashboard: every PromQL expression names only metrics the
  worker, the cache or the sink declare (their real collectors, imported),
  or the few from kafka-exporter listed below.
- compose/prometheus/prometheus.yml with `promtool check config`.
- the Dockerfile: the Maven artifact version and tokenizer pin match the
  code's, and the final stage runs as a non-root user.

A missing tool is a failure with the install line, never a skip: `make
setup` (the dev extras) and .ci/run (apt: prometheus) install them all.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"

# kafka-exporter (danielqsj/kafka-exporter, compose's `kafka-exporter`): the
# consumer lag the worker does not export itself. `up`: Prometheus' own.
EXPORTER_METRICS = {
    "up",
    "kafka_consumergroup_lag",
    "kafka_consumergroup_lag_sum",
    "kafka_consumergroup_current_offset",
    "kafka_topic_partition_current_offset",
    "kafka_topic_partitions",
}

# The Kubernetes version whose schemas the objects are checked against.
K8S_VERSION = "1.30"

_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}  # fmt: skip


class ToolMissing(RuntimeError):
    """A validator is not installed; the message says how to install it."""


# -- compose ---------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?+])([^}]*))?\}|\$(\w+)")


def interpolate(text: str) -> str:
    """`${VAR:-default}` and friends as Compose fills them with no variable
    set (the defaults are what CI checks); `$$` is a literal `$`."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        op, default = m.group(2), m.group(3) or ""
        return default if op in (":-", "-") else ""

    return _VAR.sub(one, text)


def compose_schema() -> dict[str, Any]:
    try:
        import check_jsonschema
    except ImportError:
        raise ToolMissing("check-jsonschema is not installed: pip install -e '.[dev]' (make setup)") from None
    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    if not path.is_file():
        raise ToolMissing(f"check-jsonschema has no compose-spec schema at {path}: pip install -e '.[dev]'")
    return json.loads(path.read_text())


def schema_errors(doc: Any, schema: dict[str, Any]) -> Iterator[str]:
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(top)"
        yield f"{where}: {err.message}"


def check_compose(path: Path) -> list[str]:
    doc = yaml.safe_load(interpolate(path.read_text()))
    problems = [f"{path.name}: {e}" for e in schema_errors(doc, compose_schema())]
    services = doc.get("services") or {}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep, spec in deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps):
            if dep not in services:
                problems.append(f"{path.name}: service {name} depends on {dep}, which is not a service")
            elif (spec or {}).get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{path.name}: service {name} waits for {dep} to be healthy, which has no healthcheck")
        for vol in svc.get("volumes") or []:
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")) and not (path.parent / src).exists():
                problems.append(f"{path.name}: service {name} mounts {src}, which does not exist")
        build = svc.get("build")
        if isinstance(build, dict):
            dockerfile = path.parent / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{path.name}: service {name} builds from {dockerfile}, which does not exist")
    return problems


# -- Kubernetes ------------------------------------------------------------------


def k8s_objects(folder: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """(problems, [(file, object)]) of the files the kustomization lists."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    listed = kust.get("resources") or []
    problems = [
        f"{folder.name}/{f}: listed in kustomization.yaml, missing" for f in listed if not (folder / f).is_file()
    ]
    for f in sorted(folder.glob("*.yaml")):
        if f.name != "kustomization.yaml" and f.name not in listed:
            problems.append(f"{folder.name}/{f.name}: not listed in kustomization.yaml resources")
    objects = [
        (f, doc)
        for f in listed
        if (folder / f).is_file()
        for doc in yaml.safe_load_all((folder / f).read_text())
        if doc
    ]
    return problems, objects


def check_k8s(folder: Path, keda_schema: Path = COMPOSE / "schemas" / "keda-scaledobject.json") -> list[str]:
    try:
        import kubernetes_validate
    except ImportError:
        raise ToolMissing("kubernetes-validate is not installed: pip install -e '.[dev]' (make setup)") from None
    problems, objects = k8s_objects(folder)
    keda = json.loads(keda_schema.read_text())
    for f, obj in objects:
        label = f"{folder.name}/{f} {obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        if obj.get("kind") == "ScaledObject":
            problems += [f"{label}: {e}" for e in schema_errors(obj, keda)]
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path) or "(top)"
            problems.append(f"{label}: {where}: {exc.message}")
        except Exception as exc:  # unknown kind or version: say so, do not pass it
            problems.append(f"{label}: {type(exc).__name__}: {exc}")
    return problems + agreement(folder.name, objects)


def agreement(where: str, objects: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Numbers and names that must match across the manifests."""
    from sluice.settings import Settings

    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, obj in objects:
        by_kind.setdefault(obj.get("kind", ""), []).append(obj)
    config: dict[str, str] = {}
    for cm in by_kind.get("ConfigMap", []):
        config.update(cm.get("data") or {})
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    partitions = Settings.model_fields["request_partitions"].default
    problems = []
    for so in by_kind.get("ScaledObject", []):
        spec = so.get("spec") or {}
        target = (spec.get("scaleTargetRef") or {}).get("name")
        if target not in deployments:
            problems.append(f"{where}: ScaledObject scales {target}, which is not a Deployment here")
        if spec.get("maxReplicaCount") != partitions:
            problems.append(
                f"{where}: ScaledObject maxReplicaCount {spec.get('maxReplicaCount')} != {partitions} requests partitions"
            )
        prefix = config.get("SLUICE_TOPIC_PREFIX", "sluice")
        want = {
            "bootstrapServers": config.get("SLUICE_BOOTSTRAP_SERVERS"),
            "consumerGroup": config.get("SLUICE_GROUP_ID", "sluice-workers"),
            "topic": f"{prefix}.requests",
        }
        for trig in spec.get("triggers") or []:
            meta = trig.get("metadata") or {}
            for key, value in want.items():
                if meta.get(key) != value:
                    problems.append(f"{where}: ScaledObject trigger {key} {meta.get(key)!r} != {value!r} (config.yaml)")
    drain = float(config.get("SLUICE_DRAIN_TIMEOUT_S", 30))
    for name, dep in deployments.items():
        args = [a for c in dep["spec"]["template"]["spec"].get("containers", []) for a in c.get("args", [])[:1]]
        if "worker" not in args:  # the drain timeout is the worker's
            continue
        grace = dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        if isinstance(grace, int) and grace <= drain:  # a wrong type is the schema check's to report
            problems.append(f"{where}: {name} terminationGracePeriodSeconds {grace} <= SLUICE_DRAIN_TIMEOUT_S {drain}")
    return problems


# -- Grafana -----------------------------------------------------------------------


def exported_metrics() -> set[str]:
    """Sample names the worker (with its cache), the sink, the autoscaler and admission expose, read from
    their real collectors: a counter `x` exposes x_total, a histogram
    x_bucket, x_sum and x_count."""
    from processors.admission.stage import AdmissionMetrics
    from processors.cache import CacheMetrics
    from processors.metrics import WorkerMetrics
    from sinks.sink import SinkMetrics
    from sluice.autoscale.loop import AutoscaleMetrics

    worker, sink, scaler, admission = WorkerMetrics(), SinkMetrics(), AutoscaleMetrics(), AdmissionMetrics()
    CacheMetrics(worker.registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for registry in (worker.registry, sink.registry, scaler.registry, admission.registry):
        for family in registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a small scanner, not a parser)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "", s)  # Grafana variables
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)  # label lists
    s = re.sub(r"\boffset\s+-?\w+", "", s)
    s = re.sub(r"(?<![\w:])\d[\w.+-]*", "", s)  # numbers and durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", s):
        tok = m.group(0)
        if s[m.end() :].lstrip().startswith("(") or tok in _AGGREGATIONS or tok.lower() in _KEYWORDS:
            continue
        names.add(tok)
    return names


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels") or [])  # rows hold their panels


def check_dashboard(path: Path, datasources: Path, known: set[str] | None = None) -> list[str]:
    known = (known if known is not None else exported_metrics()) | EXPORTER_METRICS
    uids = {d.get("uid") for d in yaml.safe_load(datasources.read_text()).get("datasources") or []}
    problems = []
    dash = json.loads(path.read_text())
    for panel in _panels(dash.get("panels") or []):
        title = panel.get("title", panel.get("id"))
        uid = (panel.get("datasource") or {}).get("uid")
        if panel.get("targets") and uid not in uids:
            problems.append(f"{path.name}: panel {title!r}: datasource uid {uid!r} is not provisioned ({sorted(uids)})")
        for t in panel.get("targets") or []:
            unknown = metric_names(t.get("expr", "")) - known
            if unknown:
                problems.append(f"{path.name}: panel {title!r}: no such metric {', '.join(sorted(unknown))}")
    return problems


# -- Prometheus, Dockerfile -------------------------------------------------------------


def check_prometheus(path: Path) -> list[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        raise ToolMissing("promtool not found: apt-get install prometheus (make system-deps and .ci/run do)")
    proc = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return []
    return [f"{path.name}: promtool: {line}" for line in (proc.stdout + proc.stderr).strip().splitlines()]


def check_dockerfile(path: Path) -> list[str]:
    from sluice.models import L4J_VERSION

    text = path.read_text()
    problems = []
    if f"ARG L4J_VERSION={L4J_VERSION}\n" not in text:
        problems.append(f"{path.name}: ARG L4J_VERSION is not sluice/models.py's {L4J_VERSION}")
    pin = re.search(r"^TOKENIZER_PKG\s*=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    if pin and pin.group(1) not in text:
        problems.append(f"{path.name}: does not install {pin.group(1)} (the Makefile's tokenizer pin)")
    last_stage = text.rsplit("\nFROM ", 1)[-1]
    users = re.findall(r"^USER\s+(\S+)", last_stage, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"{path.name}: the final stage must end as a non-root USER")
    return problems


def check_all(root: Path = ROOT) -> list[str]:
    c = root / "compose"
    return (
        check_compose(c / "docker-compose.yml")
        + check_k8s(c / "k8s", c / "schemas" / "keda-scaledobject.json")
        + check_dashboard(
            c / "grafana" / "dashboards" / "sluice.json",
            c / "grafana" / "provisioning" / "datasources" / "prometheus.yml",
        )
        + check_prometheus(c / "prometheus" / "prometheus.yml")
        + check_dockerfile(root / "Dockerfile")
    )


def main() -> int:
    try:
        problems = check_all()
    except ToolMissing as exc:
        print(f"compose/validate.py: {exc}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    print(f"compose/validate.py: {len(problems)} problem(s)" if problems else "compose/validate.py: all files valid")
    return 1 if problems else 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
