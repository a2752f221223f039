# Quick start: `make demo` (set up + end-to-end demo) and `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-fast bench clean

$(BIN)/koa: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/koa

demo: setup
	$(BIN)/koa demo --out demo_out

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup  # the suite without Ray (no Ray Train, Tune, Data or Jobs): for development, ~1-2 min
	$(BIN)/python -m pytest -q -m "not ray"

bench: setup  # every performance comparison side by side, with targets (benchmarks/RESULTS.md), then ROI
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/bench_roi.py

clean:
	rm -rf demo_out .pytest_cache
