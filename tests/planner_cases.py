"""Search spaces, objectives and histories shared by the planner tests (bo, random, Sobol, rl)."""

from __future__ import annotations

import math

import numpy as np

from planners import HistoryItem, Problem
from planners.space import (
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    LinearConstraint,
    Objective,
    SearchSpace,
)

MIXED = SearchSpace(parameters=[
    FloatParameter(name="temp", lower=20.0, upper=80.0),
    FloatParameter(name="conc", lower=0.01, upper=1.0, log_scale=True),
    IntParameter(name="n", lower=1, upper=5),
    CategoricalParameter(name="solvent", choices=["water", "ethanol", "toluene"]),
])

# Three fractions that must add up to 1, an inequality among two of them, and a free float.
CONSTRAINED = SearchSpace(
    parameters=[
        FloatParameter(name="f1", lower=0.0, upper=1.0),
        FloatParameter(name="f2", lower=0.0, upper=1.0),
        FloatParameter(name="f3", lower=0.0, upper=1.0),
        FloatParameter(name="temp", lower=20.0, upper=80.0),
    ],
    constraints=[
        LinearConstraint(coefficients={"f1": 1.0, "f2": 1.0, "f3": 1.0}, op="==", rhs=1.0),
        LinearConstraint.parse("f1 - 2*f2 <= 0.2"),
        LinearConstraint.parse("-f3 + 0.01*temp >= -0.5"),
    ],
)

PLAIN = SearchSpace(parameters=[
    FloatParameter(name="x1", lower=0.0, upper=1.0),
    FloatParameter(name="x2", lower=-2.0, upper=2.0),
])


def _problem(space: SearchSpace, **kw) -> Problem:
    """One maximised objective ``y`` unless ``objectives`` is given; other fields as given."""
    return Problem(space=space, objectives=kw.pop("objectives", [Objective(name="y", goal="maximize")]), **kw)


def _assert_legal(space: SearchSpace, point: dict) -> None:
    """Every parameter present, inside its bounds, of its type; every constraint met to 1e-6."""
    assert set(point) == set(space.names)
    for p in space.parameters:
        v = point[p.name]
        if isinstance(p, CategoricalParameter):
            assert v in p.choices
        elif isinstance(p, IntParameter):
            assert isinstance(v, int) and not isinstance(v, bool)
            assert p.lower <= v <= p.upper
        else:
            assert isinstance(v, float)
            assert p.lower <= v <= p.upper
    for c in space.constraints:
        assert c.satisfied(point, tol=1e-6), f"{point} breaks {c}"
    space.validate_point(point)


# ---- simple objectives and the histories BO learns from ---------------------------------
def _mixed_y(p: dict) -> float:
    return -((p["temp"] - 50.0) / 30.0) ** 2 + 0.2 * p["n"] + math.log(p["conc"]) / 5 \
        + {"water": 0.0, "ethanol": 0.5, "toluene": -0.3}[p["solvent"]]


def _constrained_y(p: dict) -> float:
    return -(p["f1"] - 0.3) ** 2 - (p["f2"] - 0.5) ** 2 + 0.005 * p["temp"]


def _plain_y(p: dict) -> float:
    return -(p["x1"] - 0.3) ** 2 - (p["x2"] - 0.5) ** 2


def _history(points: list[dict], f) -> list[HistoryItem]:  # noqa: ANN001
    return [HistoryItem(dict(p), "completed", {"y": f(p)}) for p in points]


def _mixed_points(n: int = 8) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"temp": float(rng.uniform(20, 80)), "conc": float(10 ** rng.uniform(-2, 0)),
             "n": int(rng.integers(1, 6)), "solvent": ["water", "ethanol", "toluene"][i % 3]}
            for i in range(n)]


def _constrained_points(n: int = 8) -> list[dict]:
    """Feasible points of CONSTRAINED, made without any planner."""
    rng = np.random.default_rng(1)
    out = []
    while len(out) < n:
        f = rng.dirichlet([1.0, 1.0, 1.0])
        p = {"f1": float(f[0]), "f2": float(f[1]), "f3": 1.0 - float(f[0]) - float(f[1]),
             "temp": float(rng.uniform(20, 80))}
        if CONSTRAINED.is_feasible(p, tol=0.0):
            out.append(p)
    return out


def _plain_points(n: int = 8) -> list[dict]:
    rng = np.random.default_rng(2)
    return [{"x1": float(rng.uniform(0, 1)), "x2": float(rng.uniform(-2, 2))} for _ in range(n)]
