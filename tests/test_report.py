"""What a campaign has found: the best trial, or the Pareto front and its reference point."""

from __future__ import annotations

import pytest

from orchestrator.report import best_so_far
from planners.base import HistoryItem
from planners.space import Objective


def _history(points: list[tuple[float, float]]) -> list[HistoryItem]:
    return [HistoryItem({"x": i}, "completed", {"a": a, "b": b}) for i, (a, b) in enumerate(points)]


FRONT = [(1.0, 4.0), (2.0, 2.0), (4.0, 1.0), (5.0, 5.0)]


def test_given_reference_point_of_minimised_objectives_comes_back_as_given():
    objectives = [Objective(name="a", goal="minimize"), Objective(name="b", goal="minimize")]

    best = best_so_far(_history(FRONT), objectives, reference_point=[6.0, 6.0])

    assert best.reference_point == [6.0, 6.0]
    assert best.hypervolume == pytest.approx(5 * 2 + 4 * 2 + 2 * 1)  # the front's area below (6, 6)


@pytest.mark.parametrize("goals", [("maximize", "maximize"), ("minimize", "maximize")])
def test_given_reference_point_comes_back_in_measured_units_for_every_goal(goals):
    objectives = [Objective(name="a", goal=goals[0]), Objective(name="b", goal=goals[1])]

    best = best_so_far(_history(FRONT), objectives, reference_point=[0.5, 0.5])

    assert best.reference_point == [0.5, 0.5]


def test_inferred_reference_point_is_worse_than_every_front_point_in_measured_units():
    objectives = [Objective(name="a", goal="minimize"), Objective(name="b", goal="maximize")]

    best = best_so_far(_history(FRONT), objectives)

    a_ref, b_ref = best.reference_point
    front = [(h.outcomes["a"], h.outcomes["b"]) for h in best.pareto]
    assert all(a < a_ref for a, _ in front)  # minimised: the reference lies above the front
    assert all(b > b_ref for _, b in front)  # maximised: below it


def test_reference_point_of_a_target_goal_is_the_value_above_the_target_at_the_limiting_distance():
    objectives = [Objective(name="a", goal="target", target=3.0), Objective(name="b", goal="minimize")]

    given = best_so_far(_history(FRONT), objectives, reference_point=[0.0, 6.0])
    inferred = best_so_far(_history(FRONT), objectives)

    assert given.reference_point == [0.0, 6.0]
    a_ref = inferred.reference_point[0]
    assert a_ref > 3.0
    assert all(abs(h.outcomes["a"] - 3.0) < a_ref - 3.0 for h in inferred.pareto)
