# fmnist-gcp: `make run` runs the whole pipeline (quick profile), `make test` passes the tests.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= quick
DEBIAN_DATA := /usr/share/datasets/fashion-mnist

.PHONY: run test lab data install check-sync clean-runs help

help:
	@echo "make run    - install, fetch/verify the data, run the pipeline (PROFILE=$(PROFILE)); reports under runs/"
	@echo "make test   - install and run the test suite"
	@echo "make lab    - open the notebooks in JupyterLab"
	@echo "make data   - install Debian's dataset-fashion-mnist (as root) or download, then verify sha256"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

# Debian's package when we can install it (root with apt), otherwise the loader downloads into the cache.
data: install
	@if [ ! -d $(DEBIAN_DATA) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "apt-get could not install dataset-fashion-mnist; downloading instead"; fi
	$(BIN)/fmnist data

run: data
	$(BIN)/fmnist run --profile $(PROFILE)

test: data
	$(BIN)/python -m pytest

lab: install
	$(BIN)/jupyter lab nbs/

# CI: the exported package and the cleaned notebooks must be exactly what is committed.
check-sync: install
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	@git diff --exit-code --stat -- nbs fmnist_gcp && test -z "$$(git status --porcelain -- nbs fmnist_gcp)" \
	  || (echo "nbdev-export / nbdev-clean changed files: run them and commit the result"; git status --short -- nbs fmnist_gcp; exit 1)

clean-runs:
	rm -rf runs/*/
