# Two commands matter: `make demo` and `make test`. Both set everything up from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graft-installed
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1

.PHONY: setup demo services lint typecheck layers migrations-check pytest test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a looser pin would download gigabytes of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m bench.synthetic demo .graft/demo-adapters
	$(VENV)/bin/graft register .graft/demo-adapters/code --name code --tags code
	$(VENV)/bin/graft register .graft/demo-adapters/math --name math --tags math
	$(VENV)/bin/graft register .graft/demo-adapters/toxic --name toxic --tags toxic
	$(VENV)/bin/graft merge "base + code - toxic" --name code-detox --tags demo
	$(VENV)/bin/graft show code-detox
	$(VENV)/bin/graft lineage code-detox
	# Publish the merge: with no Hub configured it goes to the local Hub folder (.graft/hub), as a tagged commit.
	$(VENV)/bin/graft publish code-detox

services:
	bash scripts/ensure-services.sh

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

layers: setup
	$(VENV)/bin/lint-imports

# `alembic check` against a scratch PostgreSQL database migrated to head: the models and migrations agree.
migrations-check: setup services
	psql -h 127.0.0.1 -U postgres -qc "drop database if exists graft_alembic_check" -c "create database graft_alembic_check"
	GRAFT_DATABASE_URL=$(PG_URL)/graft_alembic_check $(VENV)/bin/alembic upgrade head
	GRAFT_DATABASE_URL=$(PG_URL)/graft_alembic_check $(VENV)/bin/alembic check
	psql -h 127.0.0.1 -U postgres -qc "drop database graft_alembic_check"

pytest: setup services
	$(VENV)/bin/pytest -q -p no:cacheprovider

test: lint typecheck layers migrations-check pytest

clean:
	rm -rf $(VENV) .graft .mypy_cache .ruff_cache .pytest_cache
