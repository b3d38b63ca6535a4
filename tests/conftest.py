"""Test fixtures: one Prefect server for the whole run, temporary campaign directories."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before Prefect is imported anywhere: no analytics, a patient server start, a private home.
_PREFECT_HOME = tempfile.mkdtemp(prefix="labpilot-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Before torch is imported anywhere (and so in every process a test starts): one thread per torch
# op. The tests' GPs are small, where a second thread only costs synchronisation: the BO quality
# test took 43 s with torch's default of one thread per core on 2 cores, 18 s with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# Before any test module imports pyepics: the Channel Access ports of this run's IOCs, on loopback.
import tests.epics_ports  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_api_url():
    """Start one Prefect server for every test that runs a flow; point PREFECT_API_URL at it.

    Prefect 3 has no in-process API, and a temporary server per campaign costs
    5-20 s; sharing one keeps the suite fast.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


@pytest.fixture
def write_campaign(tmp_path):
    """Write a campaign YAML (given as text) into a temporary directory; return its path."""

    def _write(text: str, name: str = "campaign.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return _write


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """One headless Debian chromium for every browser test of the run (Playwright's sync API
    allows one per thread). ``make test`` installs chromium when it is missing."""
    import shutil

    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        pytest.fail(f"no chromium at {CHROMIUM}: the browser tests need it; 'make test' installs it "
                    "(apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def journal(tmp_path, monkeypatch):
    """The file where ``tests.journal_device`` writes every run it is asked to make (what reached
    the instrument); its measurements take 0.2 s unless a test sets ``LABPILOT_TEST_LATENCY``."""
    path = tmp_path / "journal.txt"
    path.touch()
    monkeypatch.setenv("LABPILOT_TEST_JOURNAL", str(path))
    monkeypatch.setenv("LABPILOT_TEST_LATENCY", "0.2")
    return path
