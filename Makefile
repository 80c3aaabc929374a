# The two commands a newcomer runs (each sets itself up in ./.venv):
#   make demo   - score, prune, export and reload the built-in SmolLM2-135M (WikiText-2 calibration)
#   make test   - the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export SHORTLLM_DATA ?= $(abspath ../shared/data)
SOURCES := $(shell git ls-files shortllm kernels csrc setup.py pyproject.toml 2>/dev/null)

.PHONY: demo test bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES) constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt ".[test]"
	touch $@

demo: venv
	$(BIN)/shortllm demo -o demo_out

# pytest (not `python -m pytest`): the installed package, with its compiled extensions, is what is tested
test: venv
	$(BIN)/pytest -q -p no:cacheprovider tests

bench: venv
	$(BIN)/pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info demo_out
