"""The reinforcement-learning planner: legal and reproducible proposals, pending points and
batches it takes into account, the options it refuses, and a search that beats random."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from planners import HistoryItem, Problem, make_planner
from planners.bo import torch_device
from planners.rl import RLPlanner, _fold
from planners.space import (
    Objective,
    OutcomeConstraint,
    SearchSpace,
)
from simulators import load_problem

from .planner_cases import (
    CONSTRAINED,
    MIXED,
    PLAIN,
    _assert_legal,
    _constrained_points,
    _constrained_y,
    _history,
    _mixed_points,
    _mixed_y,
    _plain_points,
    _plain_y,
    _problem,
)

# Small training budgets keep these tests fast; the properties tested do not depend on them.
FAST = {"train_steps": 15, "fine_tune_steps": 5, "episodes": 32, "eval_functions": 32,
        "candidates": 16, "num_features": 128}

@pytest.fixture(scope="module")
def plain_rl():
    """An rl planner after its initial design on PLAIN, its history, and its first proposal."""
    history = _history(_plain_points(), _plain_y)
    planner = make_planner("rl", _problem(PLAIN), seed=4, options=FAST)
    (proposal,) = planner.ask(1, history, [])
    return planner, history, proposal


# ---- building it ------------------------------------------------------------------------
def test_make_planner_builds_the_rl_planner_on_the_available_device():
    planner = make_planner("rl", _problem(PLAIN), seed=1, options={"horizon": 2})

    assert isinstance(planner, RLPlanner) and planner.name == "rl"
    assert planner.horizon == 2
    assert planner.tkwargs["device"] == torch_device()  # cuda when there is one


@pytest.mark.parametrize("options, match", [
    ({"horizons": 3}, "horizons"),
    ({"horizon": 0}, "horizon must be at least 1"),
    ({"initial_trials": 0}, "initial_trials must be at least 1"),
    ({"estimator": "ppo"}, "estimator must be"),
    ({"init_sd": 5.0}, "init_sd"),
])
def test_bad_rl_options_raise_value_error_naming_them(options, match):
    with pytest.raises(ValueError, match=match):
        make_planner("rl", _problem(PLAIN), options=options)


def test_fold_reflects_the_real_line_into_the_unit_interval():
    u = torch.tensor([-0.1, 0.0, 0.3, 1.0, 1.2, 2.5, -1.7])

    assert torch.allclose(_fold(u), torch.tensor([0.1, 0.0, 0.3, 1.0, 0.8, 0.5, 0.3]))


# ---- legal proposals --------------------------------------------------------------------
def test_rl_keeps_to_the_initial_design_until_enough_trials_completed():
    points = _plain_points(6)
    history = [HistoryItem(p, "failed") for p in points[:3]] + _history(points[3:], _plain_y)
    planner = make_planner("rl", _problem(PLAIN), seed=4, options=FAST)

    proposals = planner.ask(3, history, [])

    assert len(proposals) == 3
    assert all(p.model_version is None and p.predicted_mean == {} for p in proposals)
    for p in proposals:
        _assert_legal(PLAIN, p.parameters)


def test_rl_batch_respects_bounds_integers_and_choices():
    history = _history(_mixed_points(), _mixed_y)
    planner = make_planner("rl", _problem(MIXED), seed=0, options=FAST)

    proposals = planner.ask(3, history, [])

    assert len(proposals) == 3
    for prop in proposals:
        assert prop.planner == "rl" and prop.model_version == "rl-gp-8"
        _assert_legal(MIXED, prop.parameters)
    assert len({tuple(sorted(p.parameters.items())) for p in proposals}) == 3  # a batch, not one point


def test_rl_satisfies_linear_constraints_and_fractions():
    history = _history(_constrained_points(), _constrained_y)
    planner = make_planner("rl", _problem(CONSTRAINED), seed=0, options=FAST)

    proposals = planner.ask(2, history, [])

    for prop in proposals:
        _assert_legal(CONSTRAINED, prop.parameters)
        assert abs(sum(prop.parameters[f] for f in ("f1", "f2", "f3")) - 1.0) <= 1e-6


def test_rl_proposal_carries_the_models_prediction(plain_rl):
    _, _, prop = plain_rl

    _assert_legal(PLAIN, prop.parameters)
    assert prop.model_version == "rl-gp-8"
    assert set(prop.predicted_mean) == {"y"} and math.isfinite(prop.predicted_mean["y"])
    assert prop.predicted_sd["y"] >= 0
    assert prop.acquisition_value is not None and prop.acquisition_value >= 0


@pytest.mark.parametrize("estimator", ["pathwise", "reinforce"])
def test_rl_plays_multi_step_episodes_with_either_policy_gradient(estimator):
    history = _history(_mixed_points(), _mixed_y)
    options = {**FAST, "horizon": 3, "estimator": estimator}

    proposals = make_planner("rl", _problem(MIXED), seed=1, options=options).ask(2, history, [])

    assert len(proposals) == 2
    for prop in proposals:
        _assert_legal(MIXED, prop.parameters)
        assert prop.acquisition_value is not None and math.isfinite(prop.acquisition_value)


def test_rl_handles_two_objectives_and_an_outcome_constraint():
    problem = _problem(PLAIN, objectives=[Objective(name="a", goal="maximize"),
                                          Objective(name="b", goal="minimize")],
                       outcome_constraints=[OutcomeConstraint.parse("c >= 0.0")])
    points = _plain_points(8)
    history = [HistoryItem(p, "completed", {"a": _plain_y(p), "b": p["x1"] ** 2,
                                            "c": p["x2"] - 0.5}) for p in points]

    (prop,) = make_planner("rl", problem, seed=2, options=FAST).ask(1, history, [])

    _assert_legal(PLAIN, prop.parameters)
    assert set(prop.predicted_mean) == {"a", "b", "c"}


def test_rl_in_pool_mode_proposes_distinct_untried_rows():
    rows = tuple({"x1": float(a), "x2": float(b)}
                 for a in np.linspace(0, 1, 5) for b in np.linspace(-2, 2, 5))
    problem = _problem(PLAIN, pool=rows)
    history = _history(list(rows[::3]), _plain_y)
    pending = [dict(rows[1])]

    proposals = make_planner("rl", problem, seed=3, options=FAST).ask(3, history, pending)

    tried = {tuple(sorted(h.parameters.items())) for h in history} | {tuple(sorted(rows[1].items()))}
    keys = [tuple(sorted(p.parameters.items())) for p in proposals]
    assert len(set(keys)) == 3 and not set(keys) & tried
    assert all(p.parameters in rows for p in proposals)


# ---- reproducibility and pending points -------------------------------------------------
def test_rl_same_seed_and_history_give_identical_proposals_and_another_seed_does_not(plain_rl):
    _, history, first = plain_rl

    (again,) = make_planner("rl", _problem(PLAIN), seed=4, options=FAST).ask(1, list(history), [])
    (other,) = make_planner("rl", _problem(PLAIN), seed=5, options=FAST).ask(1, list(history), [])

    assert again.parameters == first.parameters
    assert again.predicted_mean == first.predicted_mean
    assert other.parameters != first.parameters


def test_rl_pending_point_changes_its_next_proposal(plain_rl):
    planner, history, first = plain_rl

    (second,) = planner.ask(1, history, [first.parameters])

    _assert_legal(PLAIN, second.parameters)
    distance = math.dist(PLAIN.encode([first.parameters])[0].tolist(),
                         PLAIN.encode([second.parameters])[0].tolist())
    assert distance > 1e-3  # not the running point again


def test_rl_restores_torchs_thread_setting():
    before = torch.get_num_threads()
    history = _history(_plain_points(), _plain_y)

    make_planner("rl", _problem(PLAIN), seed=0, options=FAST).ask(1, history, [])

    assert torch.get_num_threads() == before


# ---- it must earn its keep --------------------------------------------------------------
def _branin_regret(name: str, seed: int, design: list[dict], steps: int) -> float:
    """Simple regret on Branin after ``design`` (shared by the planners compared) and ``steps``
    proposals of planner ``name``."""
    sim = load_problem("branin")
    problem = Problem(space=SearchSpace(parameters=sim.parameters),
                      objectives=[Objective(name="y", goal="minimize")])
    planner = make_planner(name, problem, seed=seed)
    history = [HistoryItem(p, "completed", sim.evaluate(p)) for p in design]
    for _ in range(steps):
        proposal = planner.ask(1, history, [])[0]
        history.append(HistoryItem(proposal.parameters, "completed", sim.evaluate(proposal.parameters)))
    return min(h.outcomes["y"] for h in history) - sim.optimum["y"]


@pytest.mark.slow
def test_rl_beats_random_search_on_branin_from_the_same_design_on_every_seed():
    """Paired: on each seed rl and random start from the same 5 Sobol points and take 10 more.
    (Measured on seeds 0-5: rl's regret was 0.015-0.53 of random's, every seed; this checks 2 of
    them, each of which must be won, instead of a median of 3 unpaired 20-trial runs that cost
    215 s on a loaded machine.)"""
    sim = load_problem("branin")
    problem = Problem(space=SearchSpace(parameters=sim.parameters),
                      objectives=[Objective(name="y", goal="minimize")])
    rl, rand = [], []
    for seed in (0, 1):
        design = [p.parameters for p in make_planner("sobol", problem, seed=100 + seed).ask(5, [], [])]
        rl.append(_branin_regret("rl", seed, design, 10))
        rand.append(_branin_regret("random", seed, design, 10))
    assert all(a < b for a, b in zip(rl, rand, strict=True)), (rl, rand)
    assert sum(rl) < 0.75 * sum(rand), (rl, rand)
