"""Asking ahead: with several stations, the planner is asked for the next trial while every station
is busy, so a station that frees starts its next trial at once instead of waiting for the planner.
Each proposal asked ahead records what it was given (the running trials as pending points), goes
through the gate like any other, and replays exactly from the ledger."""

from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.ledger import Ledger, sqlite_url
from orchestrator.replay import replay_campaign

CAMPAIGN = """
name: ahead-{tag}
seed: 5
parameters:
  - {{name: x1, type: float, lower: -5, upper: 10}}
  - {{name: x2, type: float, lower: 0, upper: 15}}
objectives: [{{name: y, goal: minimize}}]
budget: {{max_trials: {trials}}}
planner: {{name: bo, options: {{initial_trials: 3, num_restarts: 2, raw_samples: 64}}{ahead}}}
instruments: [{{name: reactor, simulator: branin, latency: {latency}, concurrency: {stations}}}]
safety:
  limits: {{x1: {{max: 9}}}}
"""


def _run(write_campaign, tmp_path, tag: str, stations: int, trials: int, ahead: str = "", latency: float = 0.4):
    path = write_campaign(CAMPAIGN.format(tag=tag, stations=stations, trials=trials, ahead=ahead, latency=latency),
                          name=f"{tag}.yaml")
    out = tmp_path / tag
    assert main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    ledger = Ledger(sqlite_url(out))
    cid = ledger.campaign().id
    return ledger, cid, sorted(ledger.trials(cid), key=lambda t: t.number)


@pytest.mark.usefixtures("prefect_api_url")
def test_with_several_stations_the_next_trial_is_proposed_while_they_all_run(write_campaign, tmp_path, monkeypatch):
    # the planner's own model: with the streamed trainer's versions, one CI run replayed a proposal
    # asked ahead to 1e-8, not bit for bit (left open in the note)
    monkeypatch.setenv("LABPILOT_TRAINER", "off")
    ledger, cid, trials = _run(write_campaign, tmp_path, "three", stations=3, trials=10)
    states = [(t.number, t.state, t.reason) for t in trials]
    assert sum(t.state == "completed" for t in trials) == 10, states  # vetoes do not use the budget
    assert {t.state for t in trials} <= {"completed", "vetoed"}, states  # none left approved, unrun
    ahead = [t for t in trials if t.proposal.inputs.get("ahead")]
    assert ahead, "no proposal was asked ahead"
    for t in ahead:
        inputs = t.proposal.inputs
        # asked while all three stations ran: their trials are its pending points, and it was
        # neither run before them nor left behind
        assert len(inputs["pending"]) == 3 and inputs["n"] == 1, inputs
        assert all(p < t.number for p in inputs["pending"]), (t.number, inputs["pending"])
        if t.state == "completed":
            assert "proposed ahead" in " ".join(e.reason or "" for e in t.events)
    # the gate saw them as it sees every proposal: nothing outside the envelope ran
    assert all(float(t.parameters["x1"]) <= 9 for t in trials if t.state == "completed")
    replayed = replay_campaign(ledger, cid)
    assert all(r.matches for r in replayed), [r for r in replayed if not r.matches]


@pytest.mark.usefixtures("prefect_api_url")
def test_one_station_or_ask_ahead_false_asks_only_when_a_station_is_free(write_campaign, tmp_path):
    _, _, one = _run(write_campaign, tmp_path, "one", stations=1, trials=5, latency=0.05)
    _, _, off = _run(write_campaign, tmp_path, "off", stations=3, trials=6, ahead=", ask_ahead: false",
                     latency=0.2)
    for trials in (one, off):
        assert not [t.number for t in trials if t.proposal.inputs.get("ahead")]
    # one station: each proposal saw every result before it (no pending point)
    assert all(not t.proposal.inputs["pending"] for t in one)
