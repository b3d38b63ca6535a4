# One command sets everything up on a fresh machine: `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Prefect: no analytics calls to the internet, and a patient server start on a loaded machine.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the build these machines carry, so the project's
# range is already satisfied and pip pulls no CUDA wheels.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/labpilot run examples/branin.yaml --output runs/demo --fresh

# The browser test drives Debian's chromium (Playwright's own browsers cannot be downloaded here).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get install -y chromium || (apt-get update && apt-get install -y chromium)

# One worker: on two (pytest-xdist, installed with the dev extras) the suite took 310 s instead of
# 531 s, but the instrument tests' timing was not yet robust to the other worker's load in CI
# (an interlock's resume, a first Channel Access connect); `make test-fast` runs it that way.
test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest

test-fast: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
