# Nimbus: `make run` starts Nimbus on its embedded defaults, `make test` runs every check.
# Both create .venv on first use and install exactly the versions of the lock files in
# requirements/ (hash-checked). The local model's llama.cpp compiles once (minutes); pip's
# wheel cache (~/.cache/pip) makes every later install fast. `make lock` remakes the locks
# from pyproject.toml; `make test-latest` runs the checks on the newest releases instead.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCKS  := requirements
# pip installs what a lock names and nothing else: each file checked against its hashes.
LOCKED := $(BIN)/pip install -q --require-hashes
# Nimbus itself, on top of a lock: no dependencies resolved again, built by the locked
# setuptools (no isolated build environment downloading the newest one).
SELF   := $(BIN)/pip install -q --no-deps --no-build-isolation -e .

.PHONY: run test lint typecheck pytest postgres redis bench lock test-latest clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Nimbus needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed; installing Debian's python3-venv"; \
	  (apt-get update -q && apt-get install -y -q python3-venv python3-dev build-essential) && \
	  $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --require-hashes -r $(LOCKS)/build.txt

# `make test-latest` sets LATEST: the newest releases that pyproject.toml allows, not the locks.
ifdef LATEST
$(VENV)/.run-deps $(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q --upgrade --upgrade-strategy eager -e '.[local,dev]'
	@touch $(VENV)/.run-deps $(VENV)/.test-deps
else
$(VENV)/.run-deps: $(LOCKS)/local.txt $(LOCKS)/build.txt pyproject.toml | $(BIN)/python
	$(LOCKED) -r $(LOCKS)/build.txt -r $(LOCKS)/local.txt
	$(SELF)
	@touch $@

$(VENV)/.test-deps: $(LOCKS)/dev.txt $(LOCKS)/build.txt pyproject.toml | $(BIN)/python
	$(LOCKED) -r $(LOCKS)/build.txt -r $(LOCKS)/dev.txt
	$(SELF)
	@touch $@
endif

run: $(VENV)/.run-deps
	$(BIN)/nimbus serve

lint: $(VENV)/.test-deps
	$(BIN)/ruff check src tests requirements
	$(BIN)/ruff format --check src tests requirements

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

# Remake requirements/*.txt from pyproject.toml (and requirements/build.in) with uv, the
# newest releases within its ranges; commit them with the pyproject.toml change.
lock: $(VENV)/.test-deps
	$(BIN)/python $(LOCKS)/lock.py $(BIN)/uv

# Every check on the newest releases pyproject.toml allows, in a venv of their own (not part
# of `make test`): what a lock refresh would bring is seen before `make lock`, not after.
test-latest:
	rm -f .venv-latest/.run-deps .venv-latest/.test-deps
	$(MAKE) test VENV=.venv-latest LATEST=1

bench: $(VENV)/.test-deps
	$(BIN)/nimbus bench runtime

clean:
	rm -rf $(VENV) .venv-latest .mypy_cache .ruff_cache .pytest_cache
