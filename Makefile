# Every check is defined here once; .ci/run and people call the same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install lock lint format typecheck test pytest bench demo chaos broker postgres db-upgrade \
	clean compose-test

# requirements.lock pins every dependency (the image's and the tests'), so the tests run what
# ships; the project itself goes in with --no-deps, and `pip check` fails on a stale lock.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

# The benchmarks' extra: the FastStream peers they run beside the project, and py-spy.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Resolve pyproject.toml's dependencies again and rewrite requirements.lock (uv, pinned here;
# UV_NATIVE_TLS: trust the system's CA store, as pip does).
UV_VERSION := 0.13.9
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	UV_NATIVE_TLS=1 $(BIN)/python scripts/lock.py $(BIN)/uv

broker:
	./scripts/ensure-broker.sh

postgres:
	./scripts/ensure-postgres.sh

db-upgrade: install postgres
	$(BIN)/bridge db upgrade

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

pytest: install broker postgres
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(BENCH_STAMP) broker postgres
	./scripts/ensure-wrk.sh
	$(BIN)/python -m bench

demo: install broker postgres
	$(BIN)/python -m sandbox.demo

chaos: install broker postgres
	$(BIN)/pytest -m chaos -s

# Build the image and run the stack for real (needs root and a Docker engine; not in `test`).
compose-test:
	./scripts/compose-test.sh

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .hypothesis
