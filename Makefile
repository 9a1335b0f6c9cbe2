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
# --no-compile: pip byte-compiles every file it installs, one at a time (80 of 111 s here, torch's test suites
# included); `make run` is one process that imports a small part of it. `make test` starts dozens of processes,
# so it byte-compiles everything on all cores (a file written for a newer Python fails, harmlessly: `|| true`).
SITE_PACKAGES = $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# The CPU build of PyTorch first, so nothing later pulls in a multi-GB CUDA build.
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m compileall -q -j 0 $(SITE_PACKAGES) > /dev/null || true
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
