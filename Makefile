# The two commands a newcomer runs (each sets itself up in ./.venv):
#   make demo   - score, prune, export and reload the built-in SmolLM2-135M (WikiText-2 calibration)
#   make test   - the whole test suite, on the pinned versions of constraints.txt
# CI (.ci/run) also runs `make test-latest`: the tiny-model suite on the newest transformers/peft/accelerate.
PY ?= python3
VENV ?= .venv
LATEST ?= .venv-latest
BIN := $(VENV)/bin
export SHORTLLM_DATA ?= $(abspath ../shared/data)
SOURCES := $(shell git ls-files shortllm kernels csrc setup.py pyproject.toml 2>/dev/null)
# the fast suite: tiny random models only (no real model, nothing marked slow)
FAST := -m "not real_model and not slow"

.PHONY: demo test test-latest bench venv constraints clean

venv: $(VENV)/.installed

# build/ is removed first: setuptools copies build/lib into the wheel, so a module deleted from the
# source tree would otherwise still be installed from a stale build
$(VENV)/.installed: $(SOURCES) constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	rm -rf build
	$(BIN)/python -m pip install -q -c constraints.txt ".[test,gguf-test]"
	touch $@

demo: venv
	$(BIN)/shortllm demo -o demo_out

# pytest (not `python -m pytest`): the installed package, with its compiled extensions, is what is tested
test: venv
	$(BIN)/pytest -q -p no:cacheprovider tests

# the newest releases of the libraries whose internals shortllm leans on, in a venv of their own
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	rm -rf build
	$(LATEST)/bin/python -m pip install -q ".[test,gguf-test]"
	$(LATEST)/bin/python -m pip install -q --upgrade transformers peft accelerate
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -E "^(torch|transformers|peft|accelerate) "
	$(LATEST)/bin/pytest -q -p no:cacheprovider $(FAST) tests

# after a green `make test`: pin what it passed with
constraints: venv
	$(BIN)/python -m pip freeze --exclude shortllm | grep -v "^-e" | sed 's/+cpu$$//' > constraints.new
	@echo "review constraints.new (keep the header of constraints.txt), then move it over constraints.txt"

bench: venv
	$(BIN)/pytest -q benchmarks --benchmark-only

# GPU acceptance check (docs/gpu.md). Here (CI, no GPU) it runs its CPU mode at tiny size and writes
# benchmarks/results/gpu_cpu_mode.{json,md}; on a GPU machine without ./.venv run
# `python benchmarks/gpu_check.py --install` with that machine's own python instead.
.PHONY: gpu-check
gpu-check: venv
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info demo_out
