# Two commands on a fresh machine: `make example` and `make test`. Each sets up .venv first.
PY ?= python3
VENV := .venv
# torch 2.13.0 is pinned for the CPU machines: it is a CPU build there and keeps pip from
# pulling a multi-GB CUDA build. On a GPU machine, install the project into its own torch instead:
#   pip install --no-deps -e .
TORCH ?= torch==2.13.0

$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: example test
example: $(VENV)/.ready
	$(VENV)/bin/python examples/llama_generate.py

test: $(VENV)/.ready
	$(VENV)/bin/python -m pytest -q
