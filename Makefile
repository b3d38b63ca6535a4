# One command sets everything up on a fresh machine: `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Prefect: no analytics calls to the internet, and a patient server start on a loaded machine.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: demo test lint clean

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

# Two workers: most tests wait on simulated instruments, servers and subprocesses, so two share
# two cores well (531 s of pytest alone, 310 s on two workers, on the 2-core machine). By file: a
# module's tests run in its order on one worker (the IOC tests share one IOC, one after another).
test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
