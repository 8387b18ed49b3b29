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

# pip runs without --quiet: torch alone is a download of minutes, and its progress bar shows it.
$(STAMP): pyproject.toml
	@echo "==> [1/4] creating the virtualenv $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] installing $(TORCH_SPEC) (a large download the first time)"
	$(BIN)/python -m pip install --progress-bar on "$(TORCH_SPEC)"
	@echo "==> [3/4] installing Hypatia (editable) with its test extras"
	$(BIN)/python -m pip install --progress-bar on -e '.[test]'
	@echo "==> [4/4] checking that every required package imports"
	@$(BIN)/python -c "import torch, zmq, msgpack, sqlite_utils, networkx, egglog, pytest, pytest_timeout, xdist, hypothesis, psycopg" \
		|| { echo "set-up incomplete: a required package did not install" >&2; exit 1; }
	touch $(STAMP)
	@echo "==> set-up done: the commands are $(BIN)/hypatiad and $(BIN)/hypatia-ctl (or: source $(BIN)/activate)"

install: $(STAMP)

demo: $(STAMP)
	@echo "==> starting hypatiad, then compiling the example model in two processes"
	@$(BIN)/hypatiad status >/dev/null || $(BIN)/hypatiad start
	$(BIN)/python -m hypatia.client.demo
	HYPATIA_SUMMARY=1 $(BIN)/python -m hypatia.client.demo
	$(BIN)/hypatia-ctl stats

# Two workers (pytest-xdist): most tests wait on daemons and child processes, so two run well on
# two cores; each module stays on one worker (see tests/conftest.py).
TEST_WORKERS ?= 2

test: $(STAMP)
	@echo "==> running the test suite (CPU, $(TEST_WORKERS) workers; about 15 minutes on two cores)"
	$(BIN)/python -m pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

bench: $(STAMP)
	@echo "==> installing the benchmark extras (transformers, matplotlib, redis)"
	$(BIN)/python -m pip install --progress-bar on -e '.[bench]'
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

stop:
	-$(BIN)/hypatiad stop

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
