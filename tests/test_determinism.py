"""Same seed, same decisions: planners keep nothing between asks but what the ledger records,
a campaign replays exactly from its ledger, and two runs of one campaign decide alike."""

from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.ledger import Ledger, sqlite_url
from orchestrator.replay import replay_campaign
from planners import make_planner
from planners.base import HistoryItem
from simulators.problems import ANALYTIC

from .planner_cases import PLAIN, _plain_points, _plain_y, _problem

BO = {"initial_trials": 4, "num_restarts": 2, "raw_samples": 64}


def _branin(p: dict) -> float:
    return ANALYTIC["branin"]().evaluate(p)["y"]


def _walk(planner, steps: int, pass_state: bool) -> list[dict]:
    """Ask ``steps`` times, growing the history with each proposal's outcome; returns the
    ``(history, state, proposal)`` of every ask."""
    history = [HistoryItem(p, "completed", {"y": _plain_y(p)}) for p in _plain_points(5)]
    state, out = None, []
    for _ in range(steps):
        proposal = planner.ask(1, list(history), [], state=state if pass_state else None)[0]
        out.append({"history": list(history), "state": state if pass_state else None, "proposal": proposal})
        if pass_state:
            state = proposal.model_state
        history.append(HistoryItem(proposal.parameters, "completed", {"y": _plain_y(proposal.parameters)}))
    return out


def test_bo_asked_many_times_holds_no_hidden_state_a_fresh_one_lacks():
    """On main a long-lived bo warm-started its GP from its own previous ask, so a fresh bo
    with the same history and seed proposed other points in 6 of 9 model-based steps."""
    problem = _problem(PLAIN)
    long_lived = make_planner("bo", problem, 3, BO)
    for step in _walk(long_lived, 6, pass_state=False):
        fresh = make_planner("bo", problem, 3, BO).ask(1, step["history"], [])[0]
        assert fresh.parameters == step["proposal"].parameters


def test_bo_warm_start_travels_in_the_proposal_and_a_fresh_planner_repeats_it_exactly():
    problem = _problem(PLAIN)
    long_lived = make_planner("bo", problem, 5, BO)
    steps = _walk(long_lived, 6, pass_state=True)
    assert all(s["proposal"].model_state is not None for s in steps)
    assert steps[0]["state"] is None and steps[1]["state"] is not None  # warm from the 2nd ask on
    for step in steps:
        fresh = make_planner("bo", problem, 5, BO).ask(1, step["history"], [], state=step["state"])[0]
        assert fresh.parameters == step["proposal"].parameters
        assert fresh.model_state == step["proposal"].model_state
    # and the state matters: starting cold instead gives another fit
    cold = make_planner("bo", problem, 5, BO).ask(1, steps[-1]["history"], [])[0]
    assert cold.model_state != steps[-1]["proposal"].model_state


def test_a_state_that_does_not_fit_the_problem_falls_back_to_a_full_fit():
    problem = _problem(PLAIN)
    history = [HistoryItem(p, "completed", {"y": _plain_y(p)}) for p in _plain_points(6)]
    cold = make_planner("bo", problem, 1, BO).ask(1, history, [])[0]
    for bad in ({"gp": {"nonsense": [1.0]}}, {"gp": "text"}, {"other": 1}):
        again = make_planner("bo", problem, 1, BO).ask(1, history, [], state=bad)[0]
        assert again.parameters == cold.parameters


CAMPAIGN = """
name: same-seed
seed: 21
parameters:
  - {name: x1, type: float, lower: -5, upper: 10}
  - {name: x2, type: float, lower: 0, upper: 15}
objectives: [{name: y, goal: minimize}]
budget: {max_trials: 11}
planner: {name: bo, options: {initial_trials: 4, num_restarts: 2, raw_samples: 64}}
instruments: [{name: reactor, simulator: branin, latency: 0.01, noise: 0.01}]
"""


def _decisions(directory) -> tuple[Ledger, int, list]:
    ledger = Ledger(sqlite_url(directory))
    cid = ledger.campaign().id
    return ledger, cid, [(t.number, t.parameters, t.proposal.model_version) for t in ledger.trials(cid)]


@pytest.mark.usefixtures("prefect_api_url")
@pytest.mark.parametrize("trainer", ["inprocess", "off"])
def test_a_campaign_run_twice_decides_alike_and_replays_exactly_from_its_ledger(
        trainer, write_campaign, tmp_path, monkeypatch):
    monkeypatch.setenv("LABPILOT_TRAINER", trainer)
    path = write_campaign(CAMPAIGN)
    runs = []
    for k in (1, 2):
        assert main(["run", str(path), "--output", str(tmp_path / f"run{k}"), "--quiet"]) == 0
        runs.append(_decisions(tmp_path / f"run{k}"))
    (ledger, cid, first), (_, _, second) = runs
    assert len(first) == 11
    assert first == second  # every parameter bit for bit, and the model version each used
    if trainer == "inprocess":  # the model-based proposals came from the trainer's versions
        assert all("-v" in (v or "") for _, _, v in first[4:])
    replayed = replay_campaign(ledger, cid)
    assert [r.trial for r in replayed] == list(range(1, 12))
    assert all(r.matches for r in replayed), [r for r in replayed if not r.matches]


def test_rl_warm_start_travels_in_the_proposal_too():
    """The sibling of bo's warm start: on main rl kept its previous policy on the object."""
    options = {"train_steps": 15, "fine_tune_steps": 5, "episodes": 32, "eval_functions": 32,
               "candidates": 16, "num_features": 128, "warm_start": True, "initial_trials": 4}
    problem = _problem(PLAIN)
    long_lived = make_planner("rl", problem, 2, options)
    steps = _walk(long_lived, 3, pass_state=True)
    assert steps[1]["state"] is not None and steps[1]["state"]["dim"] == PLAIN.dim
    for step in steps:
        fresh = make_planner("rl", problem, 2, options).ask(1, step["history"], [], state=step["state"])[0]
        assert fresh.parameters == step["proposal"].parameters
    # asked without the state, the long-lived planner does what a fresh one does
    again = long_lived.ask(1, steps[-1]["history"], [])[0]
    assert again.parameters == make_planner("rl", problem, 2, options).ask(1, steps[-1]["history"], [])[0].parameters
