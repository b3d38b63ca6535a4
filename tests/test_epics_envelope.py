"""The safety envelope holds over Channel Access: through every planner, with attack proposals,
resumed and operator-approved trials, two ``kind: epics`` stations (each its own caproto IOC)
journal every setpoint put they receive, and none is outside a rule of the envelope.

The in-process version of this test (tests/test_safety.py) journals at the ophyd device; this
one journals at the IOC, past pyepics and the network: what reached the hardware."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planners import PLANNERS
from simulators.ioc import start_ioc
from tests.epics_ports import STATION_A, STATION_B  # set before pyepics loads (conftest)
from tests.test_safety import (
    ENVELOPE_CAMPAIGN,
    assert_runs_inside_envelope,
    envelope_scenario,
    run_envelope_campaign,
)

STATION = """\
  - name: {name}
    kind: epics
    timeout: 10
    epics:
      prefix: '{prefix}'
      parameters:
        x1: {{setpoint: x1, put_complete: true}}
        x2: {{setpoint: x2, put_complete: true}}
        solvent: {{setpoint: solvent, put_complete: true}}
      trigger: {{pv: ACQUIRE, error: ERROR}}
      counter: COUNT
      results: {{y: {{pv: y}}}}
      timeout: 3
      connection_timeout: 30    # the IOC has just started, on a loaded test machine
"""


@pytest.fixture(scope="module")
def stations(tmp_path_factory):
    """Two IOCs serving the envelope's mixed problem, each journaling the puts it receives."""
    folder = tmp_path_factory.mktemp("stations")
    handles = []
    try:
        for name, port in (("ea", STATION_A), ("eb", STATION_B)):
            journal = folder / f"{name}.jsonl"
            handles.append((name, journal, start_ioc("tests.envelope_device:PROBLEM", f"{name}:", port,
                                                     extra=["--speed", "1000", "--latency", "0.01",
                                                            "--journal", str(journal)])))
        yield handles
    finally:
        for _, _, h in handles:
            h.stop()


def _received(journal: Path, prefix: str) -> list[tuple[str, object]]:
    """(parameter, value) of every setpoint put the IOC received, in order."""
    if not journal.exists():
        return []
    out = []
    for line in journal.read_text().splitlines():
        put = json.loads(line)
        out.append((put["pv"].removeprefix(prefix), put["value"]))
    return out


def _runs(puts: list[tuple[str, object]]) -> list[dict]:
    """The puts grouped into the points a station was moved to (a run writes x1, x2, solvent)."""
    points, current = [], {}
    for name, value in puts:
        if name in current:
            points.append(current)
            current = {}
        current[name] = value
    if current:
        points.append(current)
    return points


@pytest.mark.parametrize("planner", sorted(PLANNERS))
def test_no_setpoint_outside_the_envelope_reaches_an_epics_ioc_through_any_planner(
        prefect_api_url, stations, planner):
    scenario = envelope_scenario(planner, salt="epics")
    for _, journal, _ in stations:
        journal.write_text("")
    text = ENVELOPE_CAMPAIGN.format(planner=planner, **{k: scenario[k] for k in ("rhs", "allowed", "step", "rate")})
    text = text.split("instruments:")[0] + "instruments:\n" + "".join(
        STATION.format(name=name, prefix=f"{name}:") for name, _, _ in stations) + "safety:" + text.split("safety:")[1]
    trials = run_envelope_campaign(text, scenario, "labpilot-epics-envelope-")
    started = 0
    for name, journal, _ in stations:
        runs = _runs(_received(journal, f"{name}:"))
        for sent in runs:
            assert set(sent) == {"x1", "x2", "solvent"}, (name, sent)  # every setpoint, every run
        assert_runs_inside_envelope(name, runs, scenario, step_slack=1e-9)
        started += len(runs)
    assert started == sum(t.started_at is not None for t in trials)  # what the ledger started, the IOCs saw
    assert started >= 1  # the envelope let something through: the journal is not empty by accident
