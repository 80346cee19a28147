# hpcrun: tests, lint and a demo.  `make help` lists the targets.
#
# Conventions for the test suite:
#   make test      runs every test with $(PYTHON), the real-Slurm tests included when a
#                  Slurm is up (they skip themselves otherwise).
#   make test-all  runs the suite once per CPython 3.6-3.13 found, with HPCRUN_SKIP_SLURM=1
#                  so the slow real-Slurm tests run only in `make test`, not per interpreter.

PYTHON ?= python3
DEMO_LANGUAGE ?= zh
SHELL := /bin/bash

PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo "$(HOME)/.pyenv")
MINOR_VERSIONS := 6 7 8 9 10 11 12 13
# One interpreter per minor version: a pyenv build if there is one, else python3.X on PATH.
find_python = $(or $(lastword $(sort $(wildcard $(PYENV_ROOT)/versions/3.$(1).*/bin/python3.$(1)))),$(shell command -v python3.$(1) 2>/dev/null))
PYTHONS = $(foreach minor,$(MINOR_VERSIONS),$(call find_python,$(minor)))
OLDEST_PYTHON = $(firstword $(PYTHONS))

# tests/run.py runs the test modules a few at a time, each in its own process.
RUN_TESTS := tests/run.py
PYTHON_FILES = hpcrun.py $(wildcard tests/*.py tests/*/*.py examples/*.py)
SHELL_FILES = $(wildcard hpcrun.sh examples/*.sh .ci/run tests/slurm/*.sh)

.PHONY: help test test-all lint demo bench clean

help:
	@echo "make test      run the tests with $(PYTHON) (real-Slurm tests too if Slurm is up)"
	@echo "make test-all  run the tests with every CPython 3.6-3.13 found (no real-Slurm tests)"
	@echo "make lint      compile with the oldest Python, bash -n and shellcheck the scripts"
	@echo "make demo      wrap the demo training and report it on the console (no account needed;"
	@echo "               DEMO_LANGUAGE=en for English reports)"
	@echo "make bench     run the benchmarks"
	@echo "make clean     remove caches"

test:
	$(PYTHON) $(RUN_TESTS)

test-all:
	@test -n "$(PYTHONS)" || { echo "test-all: no CPython 3.6-3.13 found" >&2; exit 1; }
	@passed=""; failed=""; \
	for py in $(PYTHONS); do \
	    version=$$("$$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])') \
	        || { failed="$$failed $$py"; continue; }; \
	    echo ">>> test-all: Python $$version ($$py)"; \
	    if HPCRUN_SKIP_SLURM=1 "$$py" $(RUN_TESTS); then \
	        passed="$$passed $$version"; \
	    else \
	        failed="$$failed $$version"; \
	    fi; \
	done; \
	echo "test-all: passed on:$${passed:- none}"; \
	for minor in $(MINOR_VERSIONS); do \
	    case " $$passed $$failed " in *" 3.$$minor."*) ;; *) echo "test-all: not found: 3.$$minor";; esac; \
	done; \
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
