"""The Ax adapter: legal proposals (bounds, integers, the space's own choices, linear
inequalities), what it refuses (equality constraints, target goals), pending and failed
trials, two objectives, pool mode, reproducibility, and ``make_planner``.

Histories are kept small so that, but for one test, every call stays inside Ax's
initialization (Sobol) phase (at most 5 trials in all): Ax's model-based step takes
seconds per call, and tens of seconds on spaces with categorical parameters.
"""

from __future__ import annotations

import numpy as np
import pytest

from planners import HistoryItem, Problem, make_planner
from planners.ax_adapter import AxPlanner
from planners.base import row_key
from planners.space import (
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    LinearConstraint,
    Objective,
    OutcomeConstraint,
    SearchSpace,
)

MIXED = SearchSpace(parameters=[
    FloatParameter(name="temp", lower=20.0, upper=80.0),
    FloatParameter(name="conc", lower=0.01, upper=1.0, log_scale=True),
    IntParameter(name="n", lower=1, upper=5),
    CategoricalParameter(name="solvent", choices=["water", "ethanol", "toluene"]),
    CategoricalParameter(name="ratio", choices=[0.5, 1, 2.5]),  # numbers as choices
])

PLAIN = SearchSpace(parameters=[
    FloatParameter(name="x1", lower=0.0, upper=1.0),
    FloatParameter(name="x2", lower=-2.0, upper=2.0),
])

INEQUALITY = SearchSpace(
    parameters=[
        FloatParameter(name="a", lower=0.0, upper=1.0),
        FloatParameter(name="b", lower=0.0, upper=1.0),
        FloatParameter(name="temp", lower=20.0, upper=80.0),
    ],
    constraints=[
        LinearConstraint.parse("a + b <= 0.8"),
        LinearConstraint.parse("a - 0.01*temp >= -0.5"),
    ],
)

FRACTIONS = SearchSpace(
    parameters=[FloatParameter(name=f"f{i}", lower=0.0, upper=1.0) for i in (1, 2, 3)],
    constraints=[LinearConstraint(coefficients={"f1": 1.0, "f2": 1.0, "f3": 1.0}, op="==", rhs=1.0)],
)


def _problem(space: SearchSpace, objective: str = "y", pool=None) -> Problem:
    return Problem(space=space, objectives=[Objective(name=objective, goal="maximize")], pool=pool)


def _plain_points(n: int, seed: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x1": float(rng.uniform(0, 1)), "x2": float(rng.uniform(-2, 2))} for _ in range(n)]


def _plain_history(points: list[dict], name: str = "y") -> list[HistoryItem]:
    return [HistoryItem(p, "completed", {name: p["x1"] - 0.5 * p["x2"] ** 2}) for p in points]


def _mixed_points(n: int) -> list[dict]:
    rng = np.random.default_rng(3)
    return [{
        "temp": float(rng.uniform(20, 80)),
        "conc": float(np.exp(rng.uniform(np.log(0.01), 0.0))),
        "n": int(rng.integers(1, 6)),
        "solvent": ["water", "ethanol", "toluene"][int(rng.integers(0, 3))],
        "ratio": [0.5, 1, 2.5][int(rng.integers(0, 3))],
    } for _ in range(n)]


def _assert_legal(space: SearchSpace, point: dict) -> None:
    """Every parameter present, in bounds, of its own type (ints as int, choices as listed)."""
    assert set(point) == set(space.names)
    for p in space.parameters:
        v = point[p.name]
        if isinstance(p, CategoricalParameter):
            assert any(v == c and type(v) is type(c) for c in p.choices), (p.name, v)
        elif isinstance(p, IntParameter):
            assert type(v) is int and p.lower <= v <= p.upper, (p.name, v)
        else:
            assert isinstance(v, float) and p.lower <= v <= p.upper, (p.name, v)
    for c in space.constraints:
        assert c.satisfied(point, tol=1e-6), (str(c), point)


# ---- legal proposals --------------------------------------------------------------------
def test_initial_proposals_respect_bounds_integers_and_choices():
    planner = AxPlanner(_problem(MIXED), seed=3)

    proposals = planner.ask(8, [], [])

    assert len(proposals) == 8
    for prop in proposals:
        assert prop.planner == "ax"
        _assert_legal(MIXED, prop.parameters)
    assert len({row_key(p.parameters) for p in proposals}) == 8
    # Ax's first trial is the centre of the space (the log-scaled float at its geometric middle)
    assert proposals[0].parameters["temp"] == pytest.approx(50.0)
    assert proposals[0].parameters["conc"] == pytest.approx(0.1)


def test_numeric_choices_come_back_as_the_spaces_own_values():
    proposals = AxPlanner(_problem(MIXED), seed=11).ask(8, [], [])

    ratios = [p.parameters["ratio"] for p in proposals]
    assert all(r in (0.5, 1, 2.5) for r in ratios) and len(set(ratios)) >= 2
    assert all(type(r) is int for r in ratios if r == 1)  # 1 stays int, not '1' or 1.0
    assert all(type(r) is float for r in ratios if r != 1)


def _history_mixed(n: int) -> list[HistoryItem]:
    return [HistoryItem(p, "completed", {"y": float(p["temp"]) / 80}) for p in _mixed_points(n)]


def test_linear_inequality_constraints_are_respected():
    planner = AxPlanner(_problem(INEQUALITY), seed=5)

    proposals = planner.ask(8, [], [])

    assert len(proposals) == 8
    for prop in proposals:
        _assert_legal(INEQUALITY, prop.parameters)


def test_equality_constraint_is_refused_with_a_pointer_to_bo():
    with pytest.raises(ValueError, match=r"equality constraint.*planner 'bo'"):
        make_planner("ax", _problem(FRACTIONS), seed=0)


def test_target_goal_is_refused_as_unsupported():
    problem = Problem(space=PLAIN, objectives=[Objective(name="size", goal="target", target=50.0)])

    with pytest.raises(ValueError, match=r"size.*'target'.*Ax adapter"):
        AxPlanner(problem, seed=0)


def test_outcome_names_that_ax_cannot_parse_still_work():
    # 'yield' is a Python keyword and 'E' a sympy constant: Ax's string parser rejects both
    problem = Problem(
        space=PLAIN,
        objectives=[Objective(name="yield", goal="maximize")],
        outcome_constraints=[OutcomeConstraint.parse("E <= 3")],
    )
    history = [HistoryItem(p, "completed", {"yield": p["x1"], "E": 1.0}) for p in _plain_points(3)]

    proposals = AxPlanner(problem, seed=1).ask(2, history, [])

    assert len(proposals) == 2
    for prop in proposals:
        _assert_legal(PLAIN, prop.parameters)


# ---- pending and failed trials ----------------------------------------------------------
def test_pending_point_is_not_proposed_again():
    planner = AxPlanner(_problem(PLAIN), seed=0)
    (centre,) = planner.ask(1, [], [])
    assert centre.parameters == {"x1": pytest.approx(0.5), "x2": pytest.approx(0.0)}

    (after,) = planner.ask(1, [], [centre.parameters])

    assert row_key(after.parameters) != row_key(centre.parameters)


def test_proposals_avoid_every_pending_point_and_each_other():
    history = _plain_history(_plain_points(1))
    pending = _plain_points(2, seed=7)

    proposals = AxPlanner(_problem(PLAIN), seed=2).ask(2, history, pending)

    keys = [row_key(p.parameters) for p in proposals]
    assert len(set(keys)) == 2
    assert not set(keys) & {row_key(p) for p in pending}


def test_failed_trials_are_accepted():
    points = _plain_points(5)
    history = [HistoryItem(p, "failed") for p in points[:2]] + _plain_history(points[2:])

    proposals = AxPlanner(_problem(PLAIN), seed=4).ask(2, history, [])

    assert len(proposals) == 2
    for prop in proposals:
        _assert_legal(PLAIN, prop.parameters)


def test_too_many_initial_trials_awaiting_results_gives_a_clear_error():
    pending = _plain_points(5, seed=9)  # Ax's whole initialization budget, all still running

    with pytest.raises(RuntimeError, match="initial_trials"):
        AxPlanner(_problem(PLAIN), seed=0).ask(1, [], pending)


# ---- several objectives -----------------------------------------------------------------
def test_two_objective_problem_returns_proposals():
    problem = Problem(
        space=PLAIN,
        objectives=[Objective(name="a", goal="maximize"), Objective(name="b", goal="minimize")],
        outcome_constraints=[OutcomeConstraint.parse("purity >= 0.9")],
    )
    history = [
        HistoryItem(p, "completed", {"a": p["x1"], "b": p["x2"] ** 2, "purity": 0.95})
        for p in _plain_points(3)
    ]

    proposals = AxPlanner(problem, seed=6).ask(2, history, [])

    assert len(proposals) == 2
    for prop in proposals:
        _assert_legal(PLAIN, prop.parameters)


# ---- pool mode --------------------------------------------------------------------------
def test_pool_mode_proposes_only_untried_pool_rows():
    pool = tuple(_mixed_points(30))
    problem = _problem(MIXED, pool=pool)
    history = [HistoryItem(dict(r), "completed", {"y": r["temp"] / 80}) for r in pool[:1]]
    pending = [dict(r) for r in pool[1:2]]

    proposals = AxPlanner(problem, seed=8).ask(3, history, pending)

    keys = [row_key(p.parameters) for p in proposals]
    assert len(set(keys)) == 3
    assert set(keys) <= {row_key(r) for r in pool[2:]}
    for prop in proposals:
        _assert_legal(MIXED, prop.parameters)


def test_pool_mode_with_too_few_untried_rows_raises():
    pool = tuple(_mixed_points(3))
    history = [HistoryItem(dict(r), "completed", {"y": 1.0}) for r in pool[:2]]

    with pytest.raises(ValueError, match="untried"):
        AxPlanner(_problem(MIXED, pool=pool), seed=0).ask(2, history, [])


# ---- reproducibility --------------------------------------------------------------------
def test_same_seed_and_history_give_identical_proposals():
    history = _history_mixed(2)
    pending = [_mixed_points(3)[2]]

    a = AxPlanner(_problem(MIXED), seed=9).ask(2, history, pending)
    b = AxPlanner(_problem(MIXED), seed=9).ask(2, list(history), list(pending))

    assert [p.parameters for p in a] == [p.parameters for p in b]
    assert [p.seed for p in a] == [p.seed for p in b]


def test_different_seeds_give_different_proposals():
    history = _history_mixed(3)

    a = AxPlanner(_problem(MIXED), seed=1).ask(2, history, [])
    b = AxPlanner(_problem(MIXED), seed=2).ask(2, history, [])

    assert [p.parameters for p in a] != [p.parameters for p in b]


# ---- make_planner, options, the model phase, logging -----------------------------------
def test_make_planner_builds_the_ax_planner_with_its_option():
    planner = make_planner("ax", _problem(PLAIN), 5, {"initial_trials": 3})

    assert isinstance(planner, AxPlanner)
    assert planner.name == "ax" and planner.seed == 5 and planner.initial_trials == 3
    (prop,) = planner.ask(1, _plain_history(_plain_points(1)), [])
    _assert_legal(PLAIN, prop.parameters)


def test_make_planner_rejects_unknown_or_bad_options():
    with pytest.raises(ValueError, match="bad option"):
        make_planner("ax", _problem(PLAIN), 0, {"num_restarts": 4})
    with pytest.raises(ValueError, match="initial_trials"):
        make_planner("ax", _problem(PLAIN), 0, {"initial_trials": 0})


def test_initial_trials_option_hands_over_to_axs_model_sooner():
    history = _plain_history(_plain_points(4))

    (default,) = AxPlanner(_problem(PLAIN), seed=3).ask(1, history, [])
    (short,) = AxPlanner(_problem(PLAIN), seed=3, initial_trials=3).ask(1, history, [])

    assert default.model_version == "ax-Sobol"  # Ax's default budget is 5 initialization trials
    assert short.model_version == "ax-MBM"  # Ax's modular BoTorch model
    _assert_legal(PLAIN, short.parameters)


def test_ask_prints_no_ax_info_lines(capfd):
    AxPlanner(_problem(PLAIN), seed=0).ask(2, _plain_history(_plain_points(2)), [])

    out, err = capfd.readouterr()
    assert "INFO" not in out + err
