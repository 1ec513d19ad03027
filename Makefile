# The two README commands are `make demo` and `make test`; everything else is a step of theirs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup system-deps demo test test-fast crds cluster-bins clean

setup: $(VENV)/.installed system-deps

# Headless Chromium checks the gallery page in a real browser. Installed from Debian's packages
# when we are root with apt; otherwise that one test says how to install it and is skipped.
system-deps:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (headless gallery test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; \
	else echo "note: chromium not installed; the gallery browser test will be skipped (apt-get install chromium)"; fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[operator,trainer,ui,dev]'
	touch $@

# Real control-plane and object-store binaries, built once from the Go module proxy into a cache.
cluster-bins:
	bash hack/cluster-bins.sh

# Regenerate deploy/crds from tinv.api (a test fails when the committed files are stale).
crds: setup
	$(PY) -m tinv.api.crdgen

# The whole suite: unit, trainer, cluster and end-to-end layers.
test: setup cluster-bins
	$(PY) -m pytest

# Only the fast layers (no control plane, no trainer runs).
test-fast: setup
	$(PY) -m pytest -m "not slow and not cluster and not e2e"

# The seed's workflow, locally on builtin:shapes (the shipped shapes-world model): validate, train the det-logo concept
# (checkpoints in ./tinv-runs), render a grid from its latest checkpoint, print the gallery path.
# One thread: the small model is faster on one core than fighting over two.
demo: setup
	$(VENV)/bin/tinv validate examples/*.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/tinv run examples/tiny-job.yaml --fresh
	OMP_NUM_THREADS=1 $(VENV)/bin/tinv run examples/tiny-grid.yaml
	@echo
	@echo "demo done: checkpoints  ->  .venv/bin/tinv checkpoints examples/tiny-job.yaml"
	@echo "           gallery      ->  tinv-runs/default/tiny-det-logo-grid-local/images/index.html"
	@echo "           TensorBoard  ->  .venv/bin/tensorboard --logdir tinv-runs"
	@echo "           web UI       ->  .venv/bin/tinv ui examples/tiny-job.yaml examples/tiny-grid.yaml   (then open http://127.0.0.1:8765/)"

clean:
	rm -rf $(VENV) build dist *.egg-info tinv-runs
