"""The fault suite's stack: a LocalStack of its own (Kafka broker and
redis-server on free ports in 39200-39299, state in a temporary folder),
never the session's shared stack nor a developer's: these tests SIGKILL the
broker and stop Redis, and would break every test sharing them.

The printed lines (one per scenario: sent, answered, lost, duplicated) are
repeated in pytest's terminal summary, so they show in CI output without -s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from processors.runtime import BUILTIN_MODELS
from sluice.stack import LocalStack
from tests.conftest import own_stack_config
from tests.faults import harness


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = own_stack_config(tmp_path_factory, "fault-stack", range(39200, 39300))
    log: list[str] = []
    stack = LocalStack(config, log=log.append)
    try:  # also when `up` fails half-way: stop what it started
        stack.up()
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with `minilm-long`: the real MiniLM whose card claims
    1024 tokens though the network has 512 positions, so a long input passes
    validation and makes ONNX Runtime raise (the poison)."""
    root = tmp_path_factory.mktemp("fault-models")
    card = json.loads((BUILTIN_MODELS / "all-minilm-l6-v2" / "card.json").read_text())
    card.update(name="minilm-long", max_tokens=1024)
    (root / "models" / "minilm-long").mkdir(parents=True)
    (root / "models" / "minilm-long" / "card.json").write_text(json.dumps(card, indent=2))
    return root


@pytest.fixture
def scenario_factory(fault_stack: LocalStack, models_dir: Path):
    def make(mode: str) -> harness.Scenario:
        sc = harness.Scenario(fault_stack, mode, models_dir)
        sc.create_topics()
        return sc

    return make


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if harness.SUMMARY:
        terminalreporter.section("fault suite: delivery under faults")
        for line in harness.SUMMARY:
            terminalreporter.write_line(line)
    if os.environ.get("SLUICE_FAULTS_SUMMARY"):
        Path(os.environ["SLUICE_FAULTS_SUMMARY"]).write_text("".join(f"{line}\n" for line in harness.SUMMARY))
