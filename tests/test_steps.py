"""Instruments that split the work: a reactor takes some parameters and makes the sample, a
station takes the others and measures it. A trial runs through them as steps in the file's
order, each station is sent only its parameters, both are kept busy, each step is in the
ledger, a SIGKILL between steps never reruns a finished step, and a file that leaves a
parameter or an objective to no instrument is refused when it is read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.ledger import Ledger, sqlite_url
from orchestrator.spec import CampaignError, load_campaign

ROOT = Path(__file__).resolve().parents[1]

CAMPAIGN = """
name: steps
seed: 4
parameters:
  - {{name: x1, type: float, lower: -5, upper: 10}}
  - {{name: x2, type: float, lower: 0, upper: 15}}
objectives: [{{name: y, goal: minimize}}]
budget: {{max_trials: {trials}}}
planner: {{name: sobol}}
instruments:
  - {{name: reactor, device: 'tests.lab_factories:pipeline_station', parameters: [x1], outcomes: [], timeout: 20}}
  - {{name: station, device: 'tests.lab_factories:pipeline_station', parameters: [x2], outcomes: [y], timeout: 20}}
"""


def _write(tmp_path: Path, trials: int, text: str = CAMPAIGN) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(text.format(trials=trials))
    return path


def _journal(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _naive(at):  # noqa: ANN001, ANN202 - SQLite hands back naive UTC
    return at.replace(tzinfo=None)


def test_a_trial_runs_through_its_steps_and_each_station_is_sent_only_its_parameters_and_kept_busy(
        tmp_path, journal, monkeypatch, prefect_api_url):
    monkeypatch.setenv("LABPILOT_TEST_LATENCY", "0.4")
    out = tmp_path / "run"
    assert main(["run", str(_write(tmp_path, trials=4)), "--output", str(out), "--quiet"]) == 0
    ledger = Ledger(sqlite_url(out))
    cid = ledger.campaign().id
    trials = ledger.trials(cid)
    assert [t.state for t in trials] == ["completed"] * 4
    lines = _journal(journal)
    assert {(w[1], w[2]) for w in lines if w[0] == "set"} == {("reactor", "x1"), ("station", "x2")}
    assert [w[1] for w in lines if w[0] == "run"].count("reactor") == 4
    for t in trials:
        steps = ledger.steps(t.id)
        assert [(s.step, s.station, s.state) for s in steps] == [(0, "reactor", "completed"), (1, "station", "completed")]
        assert steps[0].parameters == {"x1": t.parameters["x1"]} and steps[1].parameters == {"x2": t.parameters["x2"]}
        assert _naive(steps[0].finished_at) <= _naive(steps[1].started_at)  # measured after it was made
        assert t.observation.values == steps[1].values and set(t.observation.values) == {"y"}
        assert float(next(w for w in lines if w[:3] == ["set", "station", "x2"]
                          and float(w[3]) == t.parameters["x2"])[3]) == t.parameters["x2"]
        starts = [d for n, d in ledger.documents(t.id) if n == "start"]
        assert [(d["step"], d["instrument"], d["parameters"]) for d in starts] == [
            (0, "reactor", steps[0].parameters), (1, "station", steps[1].parameters)]
    # the reactor makes the next sample while the station measures the last
    made = {t.number: ledger.steps(t.id) for t in trials}
    assert any(_naive(made[k + 1][0].started_at) < _naive(made[k][1].finished_at) for k in range(1, 4))
    ledger.close()


def _launch(path: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--output", str(out),
                             "--quiet"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.slow
def test_a_campaign_killed_between_steps_continues_each_trial_at_its_next_step_and_reruns_no_step(
        tmp_path, prefect_api_url):
    journal = tmp_path / "journal.txt"
    path, out = _write(tmp_path, trials=4), tmp_path / "run"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PYTHONPATH": str(ROOT),
           "LABPILOT_TEST_JOURNAL": str(journal), "LABPILOT_TEST_LATENCY_REACTOR": "0.2",
           "LABPILOT_TEST_LATENCY_STATION": "1.5"}
    proc = _launch(path, out, env)
    deadline, between = time.monotonic() + 120, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "ledger.sqlite").exists():
                ledger = Ledger(sqlite_url(out))
                try:
                    steps = {t.id: ledger.steps(t.id) for t in ledger.trials(ledger.campaign().id, ("running",))}
                except LookupError:
                    steps = {}
                ledger.close()
                waiting = [tid for tid, s in steps.items() if [r.state for r in s] == ["completed"]]
                measuring = [tid for tid, s in steps.items() if len(s) == 2 and s[1].state == "running"]
                if waiting and measuring:  # one made and waiting for the station, one on the station
                    between, mid_run = waiting[0], measuring[0]
                    break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert between is not None, "never caught a trial between its steps"
    killed_at = len(_journal(journal))
    proc = _launch(path, out, env)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    ledger = Ledger(sqlite_url(out))
    cid = ledger.campaign().id
    steps = {t.id: ledger.steps(t.id) for t in ledger.trials(cid)}
    # the sample made before the kill is measured after it, and not made again
    assert ledger.trial(between).state == "completed"
    assert [(s.station, s.state) for s in steps[between]] == [("reactor", "completed"), ("station", "completed")]
    x1 = ledger.trial(between).parameters["x1"]
    lines = _journal(journal)
    assert [w for w in lines if w[:3] == ["set", "reactor", "x1"] and float(w[3]) == x1] == [
        ["set", "reactor", "x1", repr(x1)]]
    assert any(w[:3] == ["set", "station", "x2"] and float(w[3]) == ledger.trial(between).parameters["x2"]
               for w in lines[killed_at:])
    # the trial on the station when it was killed is abandoned, not measured again
    assert ledger.trial(mid_run).state == "abandoned"
    assert [s.state for s in steps[mid_run]] == ["completed", "abandoned"]
    # every reactor run the device made is one reactor step in the ledger, none twice
    assert [w[1] for w in lines if w[0] == "run"].count("reactor") == sum(
        1 for s in steps.values() for r in s if r.station == "reactor")
    assert ledger.runs_done(cid) == 4
    ledger.close()


@pytest.mark.parametrize("change,field,words", [
    (("parameters: [x1], outcomes: []", "parameters: [], outcomes: []"), "parameters[0]",
     "parameter 'x1' is taken by no instrument"),
    (("outcomes: [y]", "outcomes: []"), "objectives[0].name", "objective 'y' is measured by no instrument"),
    (("parameters: [x2]", "parameters: [x2, x3]"), "instruments[1].parameters", "['x3'] are not parameters"),
    (("device: 'tests.lab_factories:pipeline_station', parameters: [x2]", "kind: manual, parameters: [x2]"),
     "instruments[1].kind", "cannot be a step yet"),
])
def test_a_file_that_leaves_work_to_no_instrument_is_refused_naming_the_field(tmp_path, change, field, words):
    text = CAMPAIGN.replace(*change)
    with pytest.raises(CampaignError) as info:
        load_campaign(_write(tmp_path, trials=3, text=text))
    found = {(i.path, i.message) for i in info.value.issues}
    assert any(path == field and words in message for path, message in found), found


def test_the_envelopes_station_rules_apply_to_the_parameters_each_station_is_sent(
        tmp_path, journal, monkeypatch, prefect_api_url):
    """max_step on x2 binds the station that takes x2; the reactor, which takes x1 alone, is free."""
    monkeypatch.setenv("LABPILOT_TEST_LATENCY", "0.1")
    out = tmp_path / "run"
    text = CAMPAIGN + "safety: {{max_step: {{x2: 0.001}}}}\n"
    assert main(["run", str(_write(tmp_path, trials=3, text=text)), "--output", str(out), "--quiet"]) == 0
    ledger = Ledger(sqlite_url(out))
    trials = ledger.trials(ledger.campaign().id)
    assert [t.state for t in trials] == ["completed", "abandoned", "abandoned"]
    for t in trials[1:]:
        assert "step 2 refused by the safety envelope: safety.max_step.x2" in t.reason
        assert [(s.station, s.state) for s in ledger.steps(t.id)] == [("reactor", "completed")]
    assert sorted(w[1] for w in _journal(journal) if w[0] == "run") == ["reactor", "reactor", "reactor", "station"]
    ledger.close()
