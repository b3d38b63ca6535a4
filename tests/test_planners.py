"""Planners: every proposal is a legal point of the search space (bounds, integers, choices,
linear constraints, fractions that sum to a total), proposals are reproducible from the seed
and history, and the unit-cube encoding round-trips."""

from __future__ import annotations

import math

import pytest
import torch

from planners import PLANNERS, HistoryItem, make_planner
from planners.space import (
    CategoricalParameter,
    LinearConstraint,
    SearchSpace,
)

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

# Small acquisition budgets keep the BO tests fast; the properties tested do not depend on them.
BO_OPTIONS = {"initial_trials": 5, "num_restarts": 2, "raw_samples": 32, "mc_samples": 32}


@pytest.fixture(scope="module")
def plain_bo():
    """A BO planner after its initial design on PLAIN, its history, and its first proposal."""
    history = _history(_plain_points(), _plain_y)
    planner = make_planner("bo", _problem(PLAIN), seed=4, options=BO_OPTIONS)
    (proposal,) = planner.ask(1, history, [])
    return planner, history, proposal


# ---- legal proposals --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["random", "sobol", "bo"])
def test_initial_proposals_respect_bounds_integers_and_choices(name):
    planner = make_planner(name, _problem(MIXED), seed=3, options=BO_OPTIONS if name == "bo" else None)

    proposals = planner.ask(16, [], [])

    assert len(proposals) == 16
    for prop in proposals:
        assert prop.planner == name
        _assert_legal(MIXED, prop.parameters)
    # the draws spread over the choices and integers rather than sticking to one
    assert len({p.parameters["solvent"] for p in proposals}) == 3
    assert len({p.parameters["n"] for p in proposals}) >= 3


@pytest.mark.parametrize("name", ["random", "sobol", "bo"])
def test_initial_proposals_satisfy_linear_constraints_and_fractions(name):
    planner = make_planner(name, _problem(CONSTRAINED), seed=5, options=BO_OPTIONS if name == "bo" else None)

    proposals = planner.ask(8, [], [])

    assert len(proposals) == 8
    for prop in proposals:
        _assert_legal(CONSTRAINED, prop.parameters)
        assert abs(sum(prop.parameters[f] for f in ("f1", "f2", "f3")) - 1.0) <= 1e-6


def test_bo_after_initial_design_respects_bounds_integers_and_choices():
    history = _history(_mixed_points(), _mixed_y)
    planner = make_planner("bo", _problem(MIXED), seed=0, options=BO_OPTIONS)

    (prop,) = planner.ask(1, history, [])

    assert prop.model_version == "gp-8"  # the model was used, not the initial design
    _assert_legal(MIXED, prop.parameters)


def test_bo_after_initial_design_satisfies_linear_constraints_and_fractions():
    history = _history(_constrained_points(), _constrained_y)
    planner = make_planner("bo", _problem(CONSTRAINED), seed=0, options=BO_OPTIONS)

    (prop,) = planner.ask(1, history, [])

    assert prop.model_version == "gp-8"
    _assert_legal(CONSTRAINED, prop.parameters)
    assert abs(sum(prop.parameters[f] for f in ("f1", "f2", "f3")) - 1.0) <= 1e-6


def test_bo_proposal_carries_the_models_prediction(plain_bo):
    _, _, prop = plain_bo

    _assert_legal(PLAIN, prop.parameters)
    assert prop.planner == "bo"
    assert prop.model_version == "gp-8"
    assert set(prop.predicted_mean) == {"y"} and set(prop.predicted_sd) == {"y"}
    assert math.isfinite(prop.predicted_mean["y"])
    assert prop.predicted_sd["y"] >= 0
    assert prop.acquisition_value is not None and math.isfinite(prop.acquisition_value)


def test_bo_keeps_to_the_initial_design_until_enough_trials_completed():
    # five failures and four completions: fewer than initial_trials=5 completed points
    points = _plain_points(9)
    history = [HistoryItem(p, "failed") for p in points[:5]] + _history(points[5:], _plain_y)
    planner = make_planner("bo", _problem(PLAIN), seed=4, options=BO_OPTIONS)

    (prop,) = planner.ask(1, history, [])

    assert prop.model_version is None
    assert prop.predicted_mean == {}
    _assert_legal(PLAIN, prop.parameters)


# ---- reproducibility --------------------------------------------------------------------
def test_bo_same_seed_and_history_give_identical_proposals(plain_bo):
    _, history, first = plain_bo
    again = make_planner("bo", _problem(PLAIN), seed=4, options=BO_OPTIONS)

    (second,) = again.ask(1, list(history), [])

    assert second.parameters == first.parameters
    assert second.predicted_mean == first.predicted_mean


@pytest.mark.parametrize("name", ["sobol", "random"])
def test_baseline_same_seed_and_history_give_identical_proposals(name):
    history = _history(_plain_points(3), _plain_y)
    a = make_planner(name, _problem(MIXED), seed=9).ask(4, history, [])
    b = make_planner(name, _problem(MIXED), seed=9).ask(4, history, [])

    assert [p.parameters for p in a] == [p.parameters for p in b]


@pytest.mark.parametrize("name", ["random", "sobol", "bo"])
def test_different_seeds_give_different_proposals(name):
    options = BO_OPTIONS if name == "bo" else None
    a = make_planner(name, _problem(PLAIN), seed=1, options=options).ask(4, [], [])
    b = make_planner(name, _problem(PLAIN), seed=2, options=options).ask(4, [], [])

    assert [p.parameters for p in a] != [p.parameters for p in b]


def test_random_planner_moves_on_as_the_history_grows():
    planner = make_planner("random", _problem(PLAIN), seed=1)
    first = planner.ask(2, [], [])
    later = planner.ask(2, _history(_plain_points(1), _plain_y), [])

    assert [p.parameters for p in first] != [p.parameters for p in later]


def test_sobol_continues_its_sequence_where_the_history_left_off():
    planner = make_planner("sobol", _problem(PLAIN), seed=6)
    all_at_once = planner.ask(4, [], [])
    done = [HistoryItem(p.parameters, "completed", {"y": 0.0}) for p in all_at_once[:2]]

    rest = planner.ask(1, done, [all_at_once[2].parameters])

    assert rest[0].parameters == all_at_once[3].parameters


def test_bo_pending_point_changes_its_next_proposal(plain_bo):
    planner, history, first = plain_bo

    (second,) = planner.ask(1, history, [first.parameters])

    _assert_legal(PLAIN, second.parameters)
    distance = math.dist(PLAIN.encode([first.parameters])[0].tolist(),
                         PLAIN.encode([second.parameters])[0].tolist())
    assert distance > 1e-3  # not the running point again


# ---- the encoding -----------------------------------------------------------------------
def test_encode_maps_points_into_the_unit_cube_with_one_column_per_choice():
    points = [
        {"temp": 20.0, "conc": 0.01, "n": 1, "solvent": "water"},
        {"temp": 80.0, "conc": 1.0, "n": 5, "solvent": "toluene"},
        {"temp": 50.0, "conc": 0.1, "n": 3, "solvent": "ethanol"},
    ]

    X = MIXED.encode(points)

    assert MIXED.dim == 6
    assert X.shape == (3, 6) and X.dtype == torch.double
    assert bool(((X >= 0) & (X <= 1)).all())
    assert X[2, 0].item() == pytest.approx(0.5)   # linear float: midpoint
    assert X[2, 1].item() == pytest.approx(0.5)   # log float: 0.1 is halfway from 0.01 to 1
    assert X[2, 2].item() == pytest.approx(0.5)   # int 3 of 1..5
    assert X[:, 3:].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_decode_of_encode_returns_the_same_points():
    points = _mixed_points(12) + [
        {"temp": 20.0, "conc": 0.01, "n": 1, "solvent": "water"},
        {"temp": 80.0, "conc": 1.0, "n": 5, "solvent": "toluene"},
    ]

    decoded = MIXED.decode(MIXED.encode(points))

    for original, back in zip(points, decoded, strict=True):
        assert back["n"] == original["n"] and isinstance(back["n"], int)
        assert back["solvent"] == original["solvent"]
        assert back["temp"] == pytest.approx(original["temp"], rel=1e-12)
        assert back["conc"] == pytest.approx(original["conc"], rel=1e-12)


def test_decode_clamps_and_rounds_out_of_range_columns_to_legal_values():
    X = torch.tensor([[-0.3, 1.7, 0.999, 0.2, 0.9, 0.1],
                      [1.2, -0.5, 0.0, 0.0, 0.0, 0.3]], dtype=torch.double)

    points = MIXED.decode(X)

    assert points[0] == {"temp": 20.0, "conc": pytest.approx(1.0), "n": 5, "solvent": "ethanol"}
    assert points[1] == {"temp": 80.0, "conc": pytest.approx(0.01), "n": 1, "solvent": "toluene"}


def test_categorical_with_numeric_choices_round_trips():
    space = SearchSpace(parameters=[CategoricalParameter(name="ligand", choices=[1, 2.5, "L3"])])

    assert space.decode(space.encode([{"ligand": 2.5}, {"ligand": "L3"}, {"ligand": 1}])) == \
        [{"ligand": 2.5}, {"ligand": "L3"}, {"ligand": 1}]


def test_encoded_constraints_agree_with_the_constraints_on_parameters():
    # A point on each side of every constraint must fall on the same side once encoded.
    ineq, eq = CONSTRAINED.linear_constraints_encoded()
    inside = {"f1": 0.2, "f2": 0.3, "f3": 0.5, "temp": 50.0}
    outside = {"f1": 0.9, "f2": 0.05, "f3": 0.5, "temp": 20.0}

    for point, feasible in ((inside, True), (outside, False)):
        z = CONSTRAINED.encode([point])[0]
        ok = all(float((z[idx] * coef).sum()) >= rhs - 1e-9 for idx, coef, rhs in ineq) and \
            all(abs(float((z[idx] * coef).sum()) - rhs) <= 1e-9 for idx, coef, rhs in eq)
        assert ok is feasible
        assert CONSTRAINED.is_feasible(point) is feasible


@pytest.mark.parametrize("with_equality", [False, True])
def test_bo_starting_points_satisfy_the_linear_constraints(with_equality):
    # Inequalities alone: Sobol points with the infeasible ones dropped; with an equality, the
    # hit-and-run fallback. Either way every raw sample the optimiser starts from is feasible.
    from planners.bo import _FeasibleStarts

    ineq, eq = CONSTRAINED.linear_constraints_encoded()
    d = CONSTRAINED.dim
    bounds = torch.stack([torch.zeros(d), torch.ones(d)]).double()
    starts = _FeasibleStarts(bounds, ineq, eq if with_equality else None)

    X = starts(32, 2, seed=5)

    assert X.shape == (32, 2, d)
    flat = X.reshape(-1, d).double()
    assert bool(((flat >= 0) & (flat <= 1)).all())
    for idx, coef, rhs in ineq:
        assert float(((flat[:, idx] * coef).sum(-1) - rhs).min()) >= -1e-6
    if with_equality:
        for idx, coef, rhs in eq:
            assert float(((flat[:, idx] * coef).sum(-1) - rhs).abs().max()) <= 1e-6
    else:  # space-filling and different from point to point, not one point repeated
        assert len({tuple(row.tolist()) for row in flat}) == len(flat)
    assert torch.equal(starts(32, 2, seed=5), X)  # seeded


def test_validate_point_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"temp=90.0 is outside \[20.0, 80.0\]"):
        MIXED.validate_point({"temp": 90.0, "conc": 0.1, "n": 2, "solvent": "water"})
    with pytest.raises(ValueError, match="'acetone' is not one of"):
        MIXED.validate_point({"temp": 30.0, "conc": 0.1, "n": 2, "solvent": "acetone"})
    with pytest.raises(ValueError, match="lacks parameter 'n'"):
        MIXED.validate_point({"temp": 30.0, "conc": 0.1, "solvent": "water"})
    with pytest.raises(ValueError, match="breaks constraint"):
        CONSTRAINED.validate_point({"f1": 0.5, "f2": 0.5, "f3": 0.5, "temp": 30.0})


def test_search_space_refuses_a_constraint_on_an_unknown_or_non_float_parameter():
    with pytest.raises(ValueError, match="unknown parameter 'x9'"):
        SearchSpace(parameters=PLAIN.parameters, constraints=[LinearConstraint.parse("x1 + x9 <= 3")])
    with pytest.raises(ValueError, match="'n', which is not a linear-scale float"):
        SearchSpace(parameters=MIXED.parameters, constraints=[LinearConstraint.parse("temp + n <= 30")])


# ---- building planners ------------------------------------------------------------------
def test_unknown_planner_name_raises_value_error_listing_the_planners():
    with pytest.raises(ValueError) as info:
        make_planner("annealing", _problem(PLAIN))

    message = str(info.value)
    assert "unknown planner 'annealing'" in message
    for name in PLANNERS:
        assert repr(name) in message


def test_unknown_bo_option_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="num_restart") as info:
        make_planner("bo", _problem(PLAIN), options={"num_restart": 2})

    assert "planner 'bo'" in str(info.value)


@pytest.mark.parametrize("name", ["random", "sobol"])
def test_option_for_a_planner_without_options_raises_value_error_naming_it(name):
    with pytest.raises(ValueError, match=r"takes no options \['batch'\]"):
        make_planner(name, _problem(PLAIN), options={"batch": 4})


def test_bo_with_no_initial_trials_is_refused():
    with pytest.raises(ValueError, match="initial_trials must be at least 1"):
        make_planner("bo", _problem(PLAIN), options={"initial_trials": 0})
