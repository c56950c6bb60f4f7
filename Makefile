# `make test` and `make demo` each set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) requirements.txt setup.cfg pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check wmdd_jax experiments tests bench

test: install lint
	$(PY) -m pytest -q --durations=25 -m "not torch"
	$(PY) -m pytest -q --durations=10 -m torch

demo: install
	$(PY) experiments/demo.py --workdir demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
