# Every check is defined here once; .ci/run and people call the same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install lint format typecheck test pytest bench demo chaos broker postgres db-upgrade clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The benchmarks' extra: the FastStream peers they run beside the project, and py-spy.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

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

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .hypothesis
