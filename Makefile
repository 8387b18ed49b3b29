# Two commands on a fresh machine: `make demo` (set up, start the daemon, run the example in two
# processes, print the daemon's stats) and `make test` (set up with test extras, run the suite).
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned, so that pip does not pick a different build for the range in pyproject.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hypatia-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu bench bench-quick stop clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@$(BIN)/python -c "import torch, zmq, msgpack, sqlite_utils, networkx, egglog, pytest, pytest_timeout, hypothesis, psycopg" \
		|| { echo "set-up incomplete: a required package did not install" >&2; exit 1; }
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@$(BIN)/hypatiad status >/dev/null || $(BIN)/hypatiad start
	$(BIN)/python -m hypatia.client.demo
	$(BIN)/python -m hypatia.client.demo
	$(BIN)/hypatia-ctl stats

test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

stop:
	-$(BIN)/hypatiad stop

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
