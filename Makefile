# Two commands do all the set-up: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
DATA ?=
DATA_ARG := $(if $(DATA),--data $(DATA),)

.PHONY: run test lint typecheck bench study clean

# `make run` needs the package; `make test` adds the development tools on top (a shorter first `make run`).
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# The CPU build of PyTorch first, so nothing later pulls in a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/lungxray train --config configs/reference.yaml $(DATA_ARG) --out runs/reference

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src/lungxray
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy src/lungxray

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
