# fmnist-gcp: `make run` runs the whole pipeline (quick profile), `make test` passes the tests.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= quick
DEBIAN_DATA := /usr/share/datasets/fashion-mnist

.PHONY: run test images lab kernel data install check-sync clean-runs help

help:
	@echo "make run    - install, fetch/verify the data, run the pipeline (PROFILE=$(PROFILE)); reports under runs/"
	@echo "make test   - install and run the test suite"
	@echo "make images - (root) build the serve and train images with buildah on a Debian base and run each (not in make test)"
	@echo "make lab    - open the notebooks in JupyterLab"
	@echo "make kernel - register this venv as the Jupyter kernel 'fmnist-gcp' (with the FMNIST_* variables set now)"
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

# lint-imports first: the layers in pyproject.toml (README, "Architecture"); a broken one names the import.
test: data
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

# The serve and train images of docker/Dockerfile built with buildah on a Debian base (no registry is needed) and run:
# the server answers the Vertex SDK's REST client, the train image runs the smoke pipeline and the training task.
# Root (buildah, mmdebstrap, apt). Not part of `make test`: about half an hour on 2 cores (README, "Images").
images: data
	@[ "$$(id -u)" = 0 ] || { echo "make images: run as root (buildah, mmdebstrap and apt-get need it)"; exit 1; }
	@command -v buildah >/dev/null && command -v mmdebstrap >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap buildah >/dev/null)
	$(BIN)/python bench/images.py

# As root (a fresh cloud VM or container, where root is the only user) JupyterLab refuses to start without
# --allow-root; we pass it only then, so a normal user's lab is started exactly as before.
lab: install
	$(BIN)/jupyter lab nbs/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# A user kernelspec for another JupyterLab (Vertex AI Workbench's own): this venv's python, and the FMNIST_*
# variables exported now written into the spec's env, so notebooks opened there see the same settings.
KERNEL_NAME ?= fmnist-gcp
kernel: install
	$(BIN)/python -m ipykernel install --user --name $(KERNEL_NAME) \
	  --display-name "fmnist-gcp (Python $$($(BIN)/python -c 'import sys; print(*sys.version_info[:2], sep=".")'))"
	$(BIN)/python -c 'import json, os; from jupyter_client.kernelspec import KernelSpecManager; \
	  p = os.path.join(KernelSpecManager().get_kernel_spec("$(KERNEL_NAME)").resource_dir, "kernel.json"); \
	  spec = json.load(open(p)); spec["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("FMNIST_")}; \
	  json.dump(spec, open(p, "w"), indent=1); print(p, "env:", ", ".join(spec["env"]) or "no FMNIST_* variables set")'

# CI: the exported package and the cleaned notebooks must be exactly what is committed.
check-sync: install
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	@git diff --exit-code --stat -- nbs fmnist_gcp && test -z "$$(git status --porcelain -- nbs fmnist_gcp)" \
	  || (echo "nbdev-export / nbdev-clean changed files: run them and commit the result"; git status --short -- nbs fmnist_gcp; exit 1)

clean-runs:
	rm -rf runs/*/
