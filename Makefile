# Nimbus: `make run` starts Nimbus on its embedded defaults, `make test` runs every check.
# Both create .venv on first use. The local model's llama.cpp compiles once (minutes);
# pip's wheel cache (~/.cache/pip) makes every later install fast.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck pytest postgres redis bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Nimbus needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed; installing Debian's python3-venv"; \
	  (apt-get update -q && apt-get install -y -q python3-venv python3-dev build-essential) && \
	  $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[local]'
	@touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[local,dev]'
	@touch $@

run: $(VENV)/.run-deps
	$(BIN)/nimbus serve

lint: $(VENV)/.test-deps
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: $(VENV)/.test-deps
	$(BIN)/mypy

# Server tests use the PostgreSQL at NIMBUS_TEST_POSTGRES_URL (default 127.0.0.1:5432) or, when
# none answers, start a throwaway cluster from the installed binaries: make sure there are some.
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "PostgreSQL binaries missing: installing Debian's postgresql"; \
	  apt-get update -q && apt-get install -y -q postgresql; }

# Scale-out tests start a throwaway redis-server: make sure the binary is there.
redis:
	@command -v redis-server >/dev/null 2>&1 || ls /usr/bin/redis-server >/dev/null 2>&1 || { \
	  echo "redis-server missing: installing Debian's redis-server"; \
	  apt-get update -q && apt-get install -y -q redis-server; }

pytest: $(VENV)/.test-deps postgres redis
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(VENV)/.test-deps
	$(BIN)/nimbus bench runtime

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
