# Quick start: `make demo` then `make test`. Both create .venv and install the project if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# Never let `flwr run` install the app's dependencies (it would pull a second, CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast smoke bench curves curves-quick clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unheard-simulate experiment=demo

smoke: $(STAMP)
	$(VENV)/bin/unheard-simulate experiment=smoke

# Accuracy/privacy curves on speechocean762 (experiments/README.md); CURVES_OUT picks the folder.
curves: $(STAMP)
	experiments/curves.sh curves $(or $(CURVES_OUT),multirun/curves/$(shell date +%Y-%m-%d_%H-%M-%S))

curves-quick: $(STAMP)
	experiments/curves.sh curves_quick $(or $(CURVES_OUT),multirun/curves_quick/$(shell date +%Y-%m-%d_%H-%M-%S))

bench: $(STAMP)
	$(VENV)/bin/unheard-bench --out bench.json

test: $(STAMP)
	$(PY) -m pytest -q

# Unit and component tests only (no simulation, no deployment), for while you work.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean-cache:
	rm -rf .cache
