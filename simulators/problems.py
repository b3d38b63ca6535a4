"""Simulated problems: analytic test functions and tables of real experiments.

A problem is the physics a simulated instrument calls (STYLE.md: keep physics
out of device classes): its parameters, the outcomes it measures, a function
from parameters to outcomes, and its known optimum where there is one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from botorch.test_functions import Branin, BraninCurrin, Hartmann

from planners.space import (
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    LinearConstraint,
    Objective,
    Parameter,
)

BUNDLED_DATA = Path(__file__).parent / "data"


class ProblemError(ValueError):
    """A simulated problem cannot be built from what was given."""


@dataclass
class SimProblem:
    """What a simulated instrument measures, and how."""

    name: str
    parameters: list[Parameter]
    outcomes: list[str]
    evaluate: Callable[[dict[str, Any]], dict[str, float]]
    objectives: list[Objective]
    optimum: dict[str, float] = field(default_factory=dict)
    constraints: list[LinearConstraint] = field(default_factory=list)
    source: str | None = None
    table: pd.DataFrame | None = None
    #: Where experiments fail (the physics breaks: a clogged line, a cracked part);
    #: ``None`` where nothing fails.
    fails: Callable[[dict[str, Any]], bool] | None = None
    #: ``pool`` for a table that is the whole world (a planner may only pick its rows).
    kind: str = "continuous"


def _botorch_problem(fn, names: list[str], outcomes: list[str], goals: list[str], name: str,
                     optimum: dict[str, float]) -> SimProblem:
    bounds = fn.bounds.double()
    params = [
        FloatParameter(name=n, lower=float(bounds[0, i]), upper=float(bounds[1, i]))
        for i, n in enumerate(names)
    ]

    def evaluate(point: dict[str, Any]) -> dict[str, float]:
        x = torch.tensor([[float(point[n]) for n in names]], dtype=torch.double)
        with torch.no_grad():
            y = fn.evaluate_true(x).reshape(-1)
        return {o: float(y[i]) for i, o in enumerate(outcomes)}

    return SimProblem(
        name=name,
        parameters=params,
        outcomes=outcomes,
        evaluate=evaluate,
        objectives=[Objective(name=o, goal=g) for o, g in zip(outcomes, goals, strict=True)],
        optimum=optimum,
        source="BoTorch test functions (botorch.test_functions)",
    )


def branin() -> SimProblem:
    """Branin on [-5, 10] x [0, 15]; minimum 0.397887 at three points."""
    return _botorch_problem(Branin(), ["x1", "x2"], ["y"], ["minimize"], "branin",
                            {"y": 0.397887})


def hartmann6() -> SimProblem:
    """Hartmann, 6 dimensions on the unit cube; minimum -3.32237."""
    return _botorch_problem(Hartmann(dim=6), [f"x{i}" for i in range(1, 7)], ["y"],
                            ["minimize"], "hartmann6", {"y": -3.32237})


def branincurrin() -> SimProblem:
    """Branin and Currin on the unit square, both minimised (two objectives).

    The hypervolume reference point used in BoTorch's studies is (18, 6)
    for the minimised pair; the Pareto front's hypervolume there is 59.36.
    """
    p = _botorch_problem(BraninCurrin(), ["x1", "x2"], ["branin", "currin"],
                         ["minimize", "minimize"], "branincurrin", {})
    p.optimum = {"hypervolume": 59.36, "ref_branin": 18.0, "ref_currin": 6.0}
    return p


def branin_failing() -> SimProblem:
    """Branin where every experiment with ``x2 > 9 - 0.4 * x1`` fails (47 % of the square,
    one of the three minima inside): a planner that does not learn it wastes trials there."""
    p = branin()
    p.name = "branin_failing"
    p.fails = lambda point: float(point["x2"]) > 9.0 - 0.4 * float(point["x1"])
    return p


ANALYTIC: dict[str, Callable[[], SimProblem]] = {
    "branin": branin,
    "hartmann6": hartmann6,
    "branincurrin": branincurrin,
    "branin_failing": branin_failing,
}


def _parse_dataset_parameter(raw: dict[str, Any], where: str) -> Parameter:
    kind = raw.get("type")
    try:
        if kind == "float":
            return FloatParameter(name=raw["name"], lower=raw.get("low", raw.get("lower")),
                                  upper=raw.get("high", raw.get("upper")))
        if kind == "int":
            return IntParameter(name=raw["name"], lower=raw.get("low", raw.get("lower")),
                                upper=raw.get("high", raw.get("upper")))
        if kind == "categorical":
            return CategoricalParameter(name=raw["name"], choices=list(raw["choices"]))
    except (KeyError, ValueError) as exc:
        raise ProblemError(f"{where}: parameter {raw!r} is malformed: {exc}") from exc
    raise ProblemError(f"{where}: parameter type {kind!r} unknown; use float, int or categorical")


def load_table(folder: str | Path) -> SimProblem:
    """A problem backed by a table of measured experiments.

    ``folder`` holds ``data.csv`` and ``dataset.yaml`` in the format of the
    shared datasets (parameters, objectives, constraints). Measuring a point
    returns the outcomes of the nearest measured row: categoricals must match
    exactly, floats are compared after scaling each to its range. Tables
    shipped with labpilot can be named alone (``suzuki``).
    """
    path = Path(folder)
    if not path.exists() and (BUNDLED_DATA / str(folder)).exists():
        path = BUNDLED_DATA / str(folder)
    meta_file, data_file = path / "dataset.yaml", path / "data.csv"
    for f in (meta_file, data_file):
        if not f.is_file():
            raise ProblemError(
                f"dataset folder {str(path)!r} has no {f.name}; a table folder holds data.csv "
                "and dataset.yaml (see shared/datasets/README.md)"
            )
    meta = yaml.safe_load(meta_file.read_text()) or {}
    params = [_parse_dataset_parameter(p, str(meta_file)) for p in meta.get("parameters", [])]
    objectives = [
        Objective(name=o["name"], goal=o.get("direction", o.get("goal", "maximize")))
        for o in meta.get("objectives", [])
    ]
    if not params or not objectives:
        raise ProblemError(f"{meta_file}: needs 'parameters' and 'objectives' lists")
    constraints = []
    for c in meta.get("constraints", []) or []:
        if c.get("type") == "sum":
            constraints.append(
                LinearConstraint(coefficients={n: 1.0 for n in c["parameters"]}, op="==",
                                 rhs=float(c["equals"]))
            )
    table = pd.read_csv(data_file)
    names = [p.name for p in params]
    outcomes = [o.name for o in objectives]
    missing = [c for c in names + outcomes if c not in table.columns]
    if missing:
        raise ProblemError(f"{data_file}: columns {missing} named in dataset.yaml are missing")

    floats = [p for p in params if not isinstance(p, CategoricalParameter)]
    cats = [p for p in params if isinstance(p, CategoricalParameter)]
    scaled = np.stack(
        [(table[p.name].to_numpy(float) - p.lower) / (p.upper - p.lower) for p in floats], axis=1
    ) if floats else np.zeros((len(table), 0))
    cat_values = table[[p.name for p in cats]].astype(str).to_numpy() if cats else None
    values = table[outcomes].to_numpy(float)

    def evaluate(point: dict[str, Any]) -> dict[str, float]:
        mask = np.ones(len(table), dtype=bool)
        if cats:
            wanted = np.array([str(point[p.name]) for p in cats])
            mask = (cat_values == wanted).all(axis=1)
            if not mask.any():
                mask = np.ones(len(table), dtype=bool)  # unmeasured combination: nearest overall
        x = np.array([(float(point[p.name]) - p.lower) / (p.upper - p.lower) for p in floats])
        dist = ((scaled - x) ** 2).sum(axis=1) if floats else np.zeros(len(table))
        if cats:
            dist = dist + np.where(mask, 0.0, 1e6)
        row = int(np.argmin(dist))
        return {o: float(values[row, i]) for i, o in enumerate(outcomes)}

    optimum = {}
    for i, o in enumerate(objectives):
        column = values[:, i]
        optimum[o.name] = float(np.nanmax(column) if o.goal == "maximize" else np.nanmin(column))
    return SimProblem(
        name=str(meta.get("name", path.name)),
        parameters=params,
        outcomes=outcomes,
        evaluate=evaluate,
        objectives=objectives,
        optimum=optimum,
        constraints=constraints,
        source=meta.get("source"),
        table=table,
        kind=str(meta.get("kind", "continuous")),
    )


def load_problem(name: str | None = None, dataset: str | Path | None = None) -> SimProblem:
    """An analytic problem by name, or a table by folder (exactly one of the two)."""
    if (name is None) == (dataset is None):
        raise ProblemError("give exactly one of 'simulator' (a problem name) or 'dataset' (a folder)")
    if dataset is not None:
        return load_table(dataset)
    key = str(name).lower()
    if key not in ANALYTIC:
        raise ProblemError(f"unknown simulator {name!r}; choose one of {sorted(ANALYTIC)} "
                           "or give 'dataset: <folder>'")
    return ANALYTIC[key]()


def regret(problem: SimProblem, best: float, outcome: str) -> float:
    """Distance of ``best`` from the known optimum of ``outcome`` (``nan`` if unknown)."""
    if outcome not in problem.optimum:
        return math.nan
    return abs(best - problem.optimum[outcome])
