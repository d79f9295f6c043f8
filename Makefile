# Two commands set everything up on a fresh machine: `make train` and `make test`.
# The environment lives in .venv and is created on first use from constraints.txt,
# so a fresh install gets exactly the versions the suite was run with.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/default
CONFIG ?= configs/default.py
ARGS ?=
# Test processes: the suite's tiny models are mostly compile time, which XLA spends on one
# core, so one process per core (pytest-xdist; a file's tests stay in one process, which
# keeps module fixtures shared). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= auto
BENCH_OUT ?= benchmarks/results

.PHONY: install train test test-slow test-experiments bench reproduce lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "uv==0.13.9"
	$(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt -e ".[test,notebooks]"
	touch $@

train: install
	$(PY) -m multitask_moe.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: install
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

# The routing-variant trainings, notebooks and long fault tests; CI runs them after
# `make test`. The whole-experiment runs are left to test-experiments (tens of minutes).
test-slow: install
	$(PY) -m pytest -q -m "slow and not experiment" tests

test-experiments: install
	$(PY) -m pytest -q -m experiment tests

bench: install
	mkdir -p $(BENCH_OUT)
	for b in moe_layer expert_parallel input_pipeline train_step extraction evolution; do \
	  if test -f benchmarks/$$b.py; then $(PY) benchmarks/$$b.py --out=$(BENCH_OUT)/$$b.json || exit 1; fi; \
	done

# The papers' claims at small scale, 3 seeds: docs/results.md and docs/results/ (runs are
# cached in workdir/experiments/full, so a killed run resumes). One claim:
# `.venv/bin/python -m multitask_moe.experiments NAME` (docs/experiments.md).
reproduce: install
	$(PY) -m multitask_moe.experiments --jobs=3 $(ARGS)

LINTED := multitask_moe tests benchmarks configs tools

# Style (ruff check, ruff format) and layering (no import cycle between subpackages).
lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(PY) tools/check_layers.py multitask_moe

clean:
	rm -rf $(VENV) workdir
