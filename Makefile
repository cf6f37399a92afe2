# cl-release: `make demo` runs the whole loop on the embedded tiny model; `make test` tests it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export AXOLOTL_DO_NOT_TRACK ?= 1
# Release repository the release targets act on (a folder made by `cl-release init`).
REPO ?= .
NOTES ?=
FROM ?=
IDS ?=
RELEASE_ARGS = $(if $(NOTES),--notes "$(NOTES)") $(if $(FROM),--from $(FROM))

.PHONY: install test test-fast demo bench bench-quick bench-continual release-major release-minor release-patch clean

install: $(BIN)/.installed

# torch first (a CPU wheel here; a plain `torch` would pull GBs of CUDA packages), then the
# package with its training extra (axolotl, peft, transformers, accelerate).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[train,dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	scripts/demo.sh

bench: install
	$(BIN)/python bench/bench_feedback.py
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_serve.py --clients 8 --requests 2000
	$(BIN)/python bench/bench_abtest.py

bench-quick: install
	$(BIN)/python bench/bench_feedback.py --quick
	$(BIN)/python bench/bench_data.py --quick
	$(BIN)/python bench/bench_eval.py --quick
	$(BIN)/python bench/bench_serve.py --quick
	$(BIN)/python bench/bench_abtest.py --quick

# Continual-learning benchmark: every strategy through real releases on the tiny model; writes
# bench/continual/RESULTS.md and its plots (about 30 minutes on 2 CPU cores). QUICK=1: one step, two strategies.
bench-continual: install
	$(BIN)/python bench/continual/run.py $(if $(QUICK),--quick,--overhead)

release-major: install
	$(BIN)/cl-release -C $(REPO) release major $(RELEASE_ARGS)

release-minor: install
	$(BIN)/cl-release -C $(REPO) release minor $(RELEASE_ARGS)

# The safety fix, as the runbook names it: `cl-release patch` (the open critical corrections, or
# IDS="req-1 req-2"): tests added, PATCH of the serving version released, made champion.
release-patch: install
	$(BIN)/cl-release -C $(REPO) patch $(IDS) $(RELEASE_ARGS)

clean:
	rm -rf demo-repo .pytest_cache build dist
