"""The wheel, installed into a fresh venv outside the checkout, finds every
file it reads at run time (SQL, DDL, model cards, the Kafka pom) in the
installed package, and names the extra to install when a heavy part is missing.

Needs PyPI for the venv's dependencies (pip caches them after the first run:
a few minutes cold, well under one warm). Nothing here imports from the
checkout: every command runs from the venv, in a folder outside it, with no
PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
QUERIES = sorted(p.stem for p in (ROOT / "sinks" / "queries").glob("*.sql"))
DATA_FILES = [
    "schemas/clickhouse/telemetry.sql",
    "processors/models/all-minilm-l6-v2/card.json",
    "sluice/stack/kafka/pom.xml",
    *(f"sinks/queries/{q}.sql" for q in QUERIES),
]


def _run(argv: list[str], cwd: Path, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SLUICE_")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _ok(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)], cwd=dist))
    (built,) = dist.glob("sluice-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with the wheel and its
    dependencies from PyPI, no extras; returns a folder outside the checkout
    to run commands in."""
    home = tmp_path_factory.mktemp("installed")
    venv.create(home / "venv", with_pip=True)
    _ok(_run([str(home / "venv" / "bin" / "pip"), "install", "-q", str(wheel)], cwd=home))
    work = home / "work"
    work.mkdir()
    return work


def _bin(site: Path, name: str) -> str:
    return str(site.parent / "venv" / "bin" / name)


def test_the_wheel_carries_every_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert QUERIES, "no named queries found in the checkout"
    assert not [f for f in DATA_FILES if f not in names], sorted(names)


def test_model_list_reads_the_installed_card(site: Path) -> None:
    out = _ok(_run([_bin(site, "sluice"), "model", "list"], cwd=site))
    line = next(ln for ln in out.splitlines() if ln.startswith("all-minilm-l6-v2"))
    assert "int8-1" in line and "embed,classify" in line
    assert str(site.parent / "venv") in line, "the card came from outside the installed package"
    assert str(ROOT) not in out


def test_analytics_list_reads_the_installed_queries(site: Path) -> None:
    out = _ok(_run([_bin(site, "sluice"), "analytics", "--list"], cwd=site))
    assert [ln.split()[0] for ln in out.splitlines() if ln.strip()] == QUERIES


def test_the_sink_ddl_creates_its_tables_from_the_installed_package(site: Path) -> None:
    snippet = (
        "from pathlib import Path\n"
        "import sinks.store as st\n"
        "print('ddl', st.DDL_PATH)\n"
        "s = st.ChdbStore(Path('chdb'), database='sluice')\n"
        "s.start()\n"
        "for (name,) in s.execute(\"SELECT name FROM system.tables WHERE database = 'sluice' ORDER BY name\")[1]:\n"
        "    print('table', name)\n"
        "s.close()\n"
    )
    out = _ok(_run([_bin(site, "python"), "-c", snippet], cwd=site))
    ddl = next(ln for ln in out.splitlines() if ln.startswith("ddl "))
    assert str(site.parent / "venv") in ddl and str(ROOT) not in ddl
    tables = {ln.split()[1] for ln in out.splitlines() if ln.startswith("table ")}
    assert {"telemetry", "telemetry_minute", "latency_minute"} <= tables
    assert (site / "chdb").is_dir()


def test_the_facade_and_the_pom(site: Path) -> None:
    snippet = (
        "import sys\n"
        "import sluice\n"
        "assert 'producers.client' not in sys.modules, 'import sluice pulled in the client'\n"
        "from sluice import KafkaConfig, SluiceClient\n"
        "print('client', SluiceClient.__module__, KafkaConfig().bootstrap_servers)\n"
        "from importlib import resources\n"
        "print('pom', 'kafka_2.13' in resources.files('sluice.stack').joinpath('kafka/pom.xml').read_text())\n"
    )
    out = _ok(_run([_bin(site, "python"), "-c", snippet], cwd=site))
    assert "client producers.client 127.0.0.1:9092" in out
    assert "pom True" in out


@pytest.mark.parametrize(
    ("argv", "extra"),
    [(["report", "--out", "r.html"], "report"), (["model", "build"], "build")],
)
def test_a_missing_extra_names_what_to_install(site: Path, argv: list[str], extra: str) -> None:
    done = _run([_bin(site, "sluice"), *argv], cwd=site, timeout_s=120)
    assert done.returncode != 0
    assert f"pip install 'sluice[{extra}]'" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
