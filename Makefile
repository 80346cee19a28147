# hpcrun: tests, lint and a demo.  `make help` lists the targets.
#
# Conventions for the test suite (tests/run.py; each tests/test_*.py says its LAYER: fast,
# process or scheduler):
#   make test      runs every test with $(PYTHON), the real-scheduler tests included when a
#                  Slurm or Grid Engine is up (they skip themselves otherwise).
#   make test-all  runs every CPython 3.6-3.13 found, all at once: the whole suite on the oldest
#                  and the newest (FULL_MINORS), the fast layer on the others ($(PYTHON)'s whole
#                  run is make test's), without the real-scheduler tests (HPCRUN_SKIP_SLURM=1,
#                  HPCRUN_SKIP_SGE=1: they run once, in make test).

PYTHON ?= python3
DEMO_LANGUAGE ?= zh
SHELL := /bin/bash

PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo "$(HOME)/.pyenv")
MINOR_VERSIONS := 6 7 8 9 10 11 12 13
# One interpreter per minor version: a pyenv build if there is one, else python3.X on PATH.
find_python = $(or $(lastword $(sort $(wildcard $(PYENV_ROOT)/versions/3.$(1).*/bin/python3.$(1)))),$(shell command -v python3.$(1) 2>/dev/null))
PYTHONS = $(foreach minor,$(MINOR_VERSIONS),$(call find_python,$(minor)))
OLDEST_PYTHON = $(firstword $(PYTHONS))
FULL_MINORS := 6 13
TEST_ALL_JOBS ?= 2

# tests/run.py runs the test modules a few at a time, each in its own process.
RUN_TESTS := tests/run.py
PYTHON_FILES = hpcrun.py $(wildcard tests/*.py tests/*/*.py examples/*.py)
SHELL_FILES = $(wildcard hpcrun.sh examples/*.sh .ci/run tests/slurm/*.sh tests/sge/*.sh)

.PHONY: help test test-all lint demo bench clean

help:
	@echo "make test      run the tests with $(PYTHON) (real-scheduler tests too if Slurm or SGE is up)"
	@echo "make test-all  run the tests with every CPython 3.6-3.13 found, at once: all of them on"
	@echo "               3.6 and 3.13, the fast layer on the others (no real-scheduler tests)"
	@echo "make lint      compile with the oldest Python, bash -n and shellcheck the scripts"
	@echo "make demo      wrap the demo training and report it on the console (no account needed;"
	@echo "               DEMO_LANGUAGE=en for English reports)"
	@echo "make bench     run the benchmarks"
	@echo "make clean     remove caches"

test:
	$(PYTHON) $(RUN_TESTS)

# Each interpreter's output goes to a file of its own and is printed, in version order, once
# all of them have ended; the summary names the versions that passed and failed.
test-all:
	@test -n "$(PYTHONS)" || { echo "test-all: no CPython 3.6-3.13 found" >&2; exit 1; }
	@dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	for py in $(PYTHONS); do \
	    minor=$$("$$py" -c 'import sys; print(sys.version_info[1])' 2>/dev/null) || continue; \
	    case " $(FULL_MINORS) " in *" $$minor "*) layer=""; what=all;; \
	        *) layer="--layer fast"; what=fast;; esac; \
	    "$$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' >"$$dir/$$minor.version"; \
	    echo "$$what" >"$$dir/$$minor.what"; echo "$$py" >"$$dir/$$minor.python"; \
	    { HPCRUN_SKIP_SLURM=1 HPCRUN_SKIP_SGE=1 "$$py" $(RUN_TESTS) -j $(TEST_ALL_JOBS) $$layer \
	          >"$$dir/$$minor.out" 2>&1; echo $$? >"$$dir/$$minor.status"; } & \
	done; \
	wait; \
	passed=""; failed=""; \
	for minor in $(MINOR_VERSIONS); do \
	    if [ ! -f "$$dir/$$minor.version" ]; then echo "test-all: not found: 3.$$minor"; continue; fi; \
	    version="$$(cat "$$dir/$$minor.version") ($$(cat "$$dir/$$minor.what"))"; \
	    echo ">>> test-all: Python $$version, $$(cat "$$dir/$$minor.python")"; \
	    cat "$$dir/$$minor.out"; \
	    if [ "$$(cat "$$dir/$$minor.status")" = 0 ]; then passed="$$passed $$version"; \
	    else failed="$$failed $$version"; fi; \
	done; \
	echo "test-all: passed on:$${passed:- none}"; \
	if [ -n "$$failed" ]; then echo "test-all: FAILED on:$$failed" >&2; exit 1; fi

lint:
	@test -n "$(OLDEST_PYTHON)" || { echo "lint: no CPython 3.6-3.13 found" >&2; exit 1; }
	@echo "compiling with $$($(OLDEST_PYTHON) --version 2>&1) ($(OLDEST_PYTHON))"
	$(OLDEST_PYTHON) -m py_compile $(PYTHON_FILES)
	@for f in $(SHELL_FILES); do bash -n "$$f" || exit 1; done; echo "bash -n: ok"
	@command -v shellcheck >/dev/null || { echo "lint: shellcheck not found (apt-get install shellcheck)" >&2; exit 1; }
	shellcheck $(SHELL_FILES)

# A clean HOME and an explicit console-only config, so no user config or key leaks in.
demo:
	@d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	mkdir -p "$$d/home" "$$d/project"; \
	printf '[notify]\nchannels = console\nlanguage = $(DEMO_LANGUAGE)\n' >"$$d/config.ini"; \
	run() { env -i PATH="$$PATH" HOME="$$d/home" LANG="$${LANG:-C.UTF-8}" TERM="$${TERM:-dumb}" "$$@"; }; \
	echo "--- 1. a training that succeeds, wrapped by hpcrun (on a cluster: in the batch job)"; \
	run $(PYTHON) hpcrun.py wrap --config "$$d/config.ini" --work-dir "$$d/project" \
	    -- $(PYTHON) "$(CURDIR)/examples/train_demo.py" || exit 1; \
	echo "--- 2. a training that crashes"; \
	run $(PYTHON) hpcrun.py wrap --config "$$d/config.ini" --work-dir "$$d/project" \
	    -- $(PYTHON) "$(CURDIR)/examples/train_demo.py" --epochs 2 --steps 10 --fail; \
	echo "(wrap exited $$?, the training's status)"; \
	echo "--- 3. the monitor reports both (on a cluster: on the login node)"; \
	run $(PYTHON) hpcrun.py monitor --once --config "$$d/config.ini" --work-dir "$$d/project"

bench:
	$(PYTHON) tests/bench.py

clean:
	rm -rf __pycache__ tests/__pycache__ tests/*/__pycache__ examples/__pycache__
