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
import yaml

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


def _botorch_problem(function: str, bounds: list[tuple[float, float]], names: list[str], outcomes: list[str],
                     goals: list[str], name: str, optimum: dict[str, float], **kwargs: Any) -> SimProblem:
    """A problem measured by BoTorch's test function ``function`` (a name in
    ``botorch.test_functions``, built with ``kwargs``) on ``bounds`` (its own domain, which a
    test checks): BoTorch and torch are imported at the first measurement, so checking a
    campaign file that names the simulator needs neither."""
    params = [FloatParameter(name=n, lower=lo, upper=hi) for n, (lo, hi) in zip(names, bounds, strict=True)]
    made: list[Any] = []

    def evaluate(point: dict[str, Any]) -> dict[str, float]:
        import torch

        if not made:
            import botorch.test_functions

            made.append(getattr(botorch.test_functions, function)(**kwargs))
        x = torch.tensor([[float(point[n]) for n in names]], dtype=torch.double)
        with torch.no_grad():
            y = made[0].evaluate_true(x).reshape(-1)
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
    return _botorch_problem("Branin", [(-5.0, 10.0), (0.0, 15.0)], ["x1", "x2"], ["y"], ["minimize"], "branin",
                            {"y": 0.397887})


def hartmann6() -> SimProblem:
    """Hartmann, 6 dimensions on the unit cube; minimum -3.32237."""
    return _botorch_problem("Hartmann", [(0.0, 1.0)] * 6, [f"x{i}" for i in range(1, 7)], ["y"],
                            ["minimize"], "hartmann6", {"y": -3.32237}, dim=6)


def branincurrin() -> SimProblem:
    """Branin and Currin on the unit square, both minimised (two objectives).

    The hypervolume reference point used in BoTorch's studies is (18, 6)
    for the minimised pair; the Pareto front's hypervolume there is 59.36.
    """
    p = _botorch_problem("BraninCurrin", [(0.0, 1.0)] * 2, ["x1", "x2"], ["branin", "currin"],
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


TABLE_FORMAT = "simulators/data/README.md"  # where the table format is documented
#: Rows of a fractions table may miss their total by this much, relative to it (the published
#: tables in simulators/data/ are exact to ~1e-16; 1e-6 still catches a fraction typed wrong).
SUM_RTOL = 1e-6
#: A cell may pass a bound by this much of the range: published tables hold bounds that are
#: their own extreme values printed with one digit fewer (agnp: 0.49885165299999995 vs 0.498851653).
BOUNDS_RTOL = 1e-9
#: At most this many bad cells are listed in one error; the rest are counted.
MAX_LISTED = 10
MISSING_OUTCOME = ("refuse", "failed")


class TableMeasurementFailed(RuntimeError):
    """The table's row for this point has no measured outcome: the experiment failed."""


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
    except (KeyError, TypeError, ValueError) as exc:
        raise ProblemError(f"{where}: parameter {raw!r} is malformed: {exc}; see {TABLE_FORMAT}") from exc
    raise ProblemError(f"{where}: parameter type {kind!r} unknown; use float, int or categorical "
                       f"(see {TABLE_FORMAT})")


def _parse_sum_constraints(meta: dict[str, Any], names: list[str], where: Path) -> list[LinearConstraint]:
    constraints = []
    for i, c in enumerate(meta.get("constraints", []) or []):
        if not isinstance(c, dict) or c.get("type") != "sum":
            raise ProblemError(f"{where}: constraints[{i}] is {c!r}; the one kind a table declares is "
                               f"'{{type: sum, parameters: [a, b], equals: 1.0}}' (see {TABLE_FORMAT})")
        members = c.get("parameters")
        unknown = [n for n in members or [] if n not in names]
        if not isinstance(members, list) or len(members) < 2 or unknown:
            raise ProblemError(f"{where}: constraints[{i}].parameters must list two or more of the "
                               f"table's parameters {names}" + (f"; {unknown} are not" if unknown else ""))
        try:
            total = float(c["equals"])
        except (KeyError, TypeError, ValueError):
            raise ProblemError(f"{where}: constraints[{i}].equals must be the number the fractions add "
                               f"up to (got {c.get('equals')!r})") from None
        constraints.append(LinearConstraint(coefficients={n: 1.0 for n in members}, op="==", rhs=total))
    return constraints


def _line(row: int) -> int:
    """The CSV line of 0-based data row ``row`` (the header is line 1)."""
    return row + 2


def _check_cells(raw: pd.DataFrame, params: list[Parameter], outcomes: list[str],
                 allow_missing: bool) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Parse every parameter and outcome cell of ``raw`` (all text).

    Returns the typed table (parameters as floats, ints or the declared choice; outcomes as
    floats, NaN where blank), a boolean ``rows`` mask of rows missing an outcome, and one
    message per bad cell.
    """
    problems: list[str] = []
    table = raw.copy()

    def bad(row: int, column: str, what: str) -> None:
        problems.append(f"line {_line(row)}, column {column!r}: {what}")

    for p in params:
        cells = raw[p.name].str.strip()
        if isinstance(p, CategoricalParameter):
            by_text = {str(c): c for c in p.choices}
            for r, v in enumerate(cells):
                if v not in by_text:
                    bad(r, p.name, f"{v!r} is not one of the choices {list(p.choices)}" if v
                        else f"is blank; write one of {list(p.choices)}")
            table[p.name] = [by_text.get(v, v) for v in cells]
            continue
        numbers = pd.to_numeric(cells, errors="coerce").to_numpy(float)
        slack = BOUNDS_RTOL * (p.upper - p.lower)
        for r, (v, x) in enumerate(zip(cells, numbers, strict=True)):
            if not np.isfinite(x):
                bad(r, p.name, f"{v!r} is not a number; write a number in [{p.lower}, {p.upper}]"
                    if v else f"is blank; write a number in [{p.lower}, {p.upper}]")
            elif not p.lower - slack <= x <= p.upper + slack:
                bad(r, p.name, f"{v} is outside [{p.lower}, {p.upper}] declared in dataset.yaml; "
                    "fix the cell or the bounds")
            elif isinstance(p, IntParameter) and x != round(x):
                bad(r, p.name, f"{v} is not a whole number (type int)")
        if isinstance(p, IntParameter):
            table[p.name] = [int(round(x)) if np.isfinite(x) else x for x in numbers]
        else:
            table[p.name] = numbers
    missing = np.zeros(len(raw), dtype=bool)
    for o in outcomes:
        cells = raw[o].str.strip()
        numbers = pd.to_numeric(cells, errors="coerce").to_numpy(float)
        for r, (v, x) in enumerate(zip(cells, numbers, strict=True)):
            if not v:
                missing[r] = True
                if not allow_missing:
                    bad(r, o, "is blank (no measured outcome); fill it in, drop the row, or add "
                        "'missing_outcome: failed' to dataset.yaml if the experiment failed")
            elif not np.isfinite(x):
                bad(r, o, f"{v!r} is not a finite number; write the measured value, or leave the "
                    "cell blank and add 'missing_outcome: failed' to dataset.yaml if the experiment failed")
        table[o] = numbers
    return table, missing, problems


def _check_sums(table: pd.DataFrame, constraints: list[LinearConstraint], skip: np.ndarray,
                data_file: Path) -> None:
    """Every row's fractions add up to their total (``skip``: rows already reported bad)."""
    for c in constraints:
        names = list(c.coefficients)
        sums = table[names].to_numpy(float).sum(axis=1)
        tol = SUM_RTOL * abs(c.rhs) if c.rhs else SUM_RTOL
        off = np.where(skip, 0.0, np.abs(sums - c.rhs))
        wrong = np.flatnonzero(off > tol)
        if len(wrong):
            worst = int(np.argmax(off))
            raise ProblemError(
                f"{data_file}: {len(wrong)} rows have fractions {names} that do not add up to "
                f"{c.rhs:g} within the tolerance {tol:g} ({SUM_RTOL:g} of the total); the worst is "
                f"line {_line(worst)}, whose fractions add up to {sums[worst]:.10g}. Fix those rows, "
                f"or the constraint in dataset.yaml (see {TABLE_FORMAT})")


def load_table(folder: str | Path) -> SimProblem:
    """A problem backed by a table of measured experiments.

    ``folder`` holds ``data.csv`` and ``dataset.yaml`` in the format described
    in ``simulators/data/README.md`` (parameters, objectives, constraints,
    ``kind``, ``missing_outcome``). Every cell is checked on load. Measuring a
    point returns the outcomes of the nearest measured row: categoricals must
    match exactly, floats are compared after scaling each to its range. Tables
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
                f"and dataset.yaml (see {TABLE_FORMAT}), or name a bundled table: "
                f"{sorted(p.name for p in BUNDLED_DATA.iterdir() if p.is_dir())}"
            )
    meta = yaml.safe_load(meta_file.read_text()) or {}
    params = [_parse_dataset_parameter(p, str(meta_file)) for p in meta.get("parameters", [])]
    objectives = [
        Objective(name=o["name"], goal=o.get("direction", o.get("goal", "maximize")))
        for o in meta.get("objectives", [])
    ]
    if not params or not objectives:
        raise ProblemError(f"{meta_file}: needs 'parameters' and 'objectives' lists (see {TABLE_FORMAT})")
    names = [p.name for p in params]
    outcomes = [o.name for o in objectives]
    constraints = _parse_sum_constraints(meta, names, meta_file)
    policy = str(meta.get("missing_outcome", "refuse"))
    if policy not in MISSING_OUTCOME:
        raise ProblemError(f"{meta_file}: missing_outcome is {policy!r}; write 'failed' (a row with a "
                           "blank outcome is a failed experiment) or leave it out (such rows are errors)")
    raw = pd.read_csv(data_file, dtype=str, keep_default_na=False)
    missing = [c for c in names + outcomes if c not in raw.columns]
    if missing:
        raise ProblemError(f"{data_file}: columns {missing} named in dataset.yaml are missing")
    table, failed, problems = _check_cells(raw, params, outcomes, allow_missing=policy == "failed")
    if problems:
        listed = "\n".join(f"  - {m}" for m in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ProblemError(f"{data_file}: {len(problems)} problem{'s' if len(problems) > 1 else ''} "
                           "in the table (line numbers count "
                           f"the header as line 1):\n{listed}{more}\nFix the cells, or dataset.yaml; "
                           f"the format is in {TABLE_FORMAT}")
    if not len(table):
        raise ProblemError(f"{data_file}: the table has no rows")
    _check_sums(table, constraints, failed, data_file)

    floats = [p for p in params if not isinstance(p, CategoricalParameter)]
    cats = [p for p in params if isinstance(p, CategoricalParameter)]
    scaled = np.stack(
        [(table[p.name].to_numpy(float) - p.lower) / (p.upper - p.lower) for p in floats], axis=1
    ) if floats else np.zeros((len(table), 0))
    cat_values = table[[p.name for p in cats]].astype(str).to_numpy() if cats else None
    values = table[outcomes].to_numpy(float)

    def nearest(point: dict[str, Any]) -> int:
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
        return int(np.argmin(dist))

    def evaluate(point: dict[str, Any]) -> dict[str, float]:
        row = nearest(point)
        if failed[row]:
            raise TableMeasurementFailed(f"line {_line(row)} of {data_file} has no measured outcome "
                                         "(missing_outcome: failed)")
        return {o: float(values[row, i]) for i, o in enumerate(outcomes)}

    def fails(point: dict[str, Any]) -> bool:
        return bool(failed[nearest(point)])

    optimum = {}
    for i, o in enumerate(objectives):
        column = values[~failed, i]
        if len(column):
            optimum[o.name] = float(column.max() if o.goal == "maximize" else column.min())
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
        fails=fails if failed.any() else None,
        kind=str(meta.get("kind", "continuous")),
    )


def pool_rows(sim: SimProblem) -> tuple[dict[str, Any], ...] | None:
    """The rows a planner may choose from when ``sim`` is a ``kind: pool`` table, each as
    ``{parameter: value}`` with plain Python values; ``None`` for anything else.

    The one place a pool is built, for campaigns (``CampaignSpec.problem``) and benchmarks
    (``orchestrator.bench``) alike."""
    if sim.kind != "pool" or sim.table is None:
        return None
    names = [p.name for p in sim.parameters]
    return tuple(
        {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        for row in sim.table[names].to_dict("records")
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
