# Two commands a fresh machine needs (see README):
#   make run    set up .venv and run the main job (end-to-end pipeline on the default world)
#   make test   set up .venv and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/main
CONFIG ?= configs/pipeline.py

.PHONY: venv run smoke test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(PY) -m launch.run_pipeline --config=$(CONFIG) --workdir=$(WORKDIR)

smoke: venv
	$(PY) -m launch.run_pipeline --config=$(CONFIG):smoke --workdir=runs/smoke

test: venv
	$(PY) -m pytest -q -n auto --dist worksteal --durations=15 tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not multiprocess" tests

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
