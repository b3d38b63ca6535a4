"""A test function under a campaign's own names: rehearse a user's campaign, not a benchmark.

``map_problem(hartmann6(), parameters, objectives, inputs={"temperature": "x1", ...},
outcomes={"yield": "y"})`` is a :class:`~simulators.problems.SimProblem` whose parameters are
the campaign's and whose outcomes carry the campaign's names:

- each campaign parameter is scaled linearly from its bounds onto the bounds of the problem
  input it is mapped to (a ``log_scale`` float in log space; an int from ``lower..upper``
  onto the whole input; a categorical's ``k`` choices onto the centres of ``k`` equal slices
  of the input, in the order they are listed), so the campaign's bounds land on the
  problem's;
- a problem input no parameter is mapped to is held at ``fixed[input]``, by default the
  midpoint of its bounds;
- a campaign outcome is the problem outcome it names, negated when the campaign's objective
  goes the other way (a maximised ``yield`` on a minimised ``y`` measures ``-y``), so the
  campaign's best is the problem's best;
- the known optimum (and hypervolume reference point) is carried over, signed, only where it
  is still reachable: every problem input mapped from a float parameter, and no linear
  constraint that could cut it off. Otherwise it is unknown, never wrong.
"""

from __future__ import annotations

import math
from typing import Any

from planners.space import (
    CategoricalParameter,
    FloatParameter,
    LinearConstraint,
    Objective,
    Parameter,
)
from simulators.problems import ProblemError, SimProblem


def unit(p: Parameter, value: Any) -> float:
    """Where ``value`` lies in ``p``'s range, as a fraction in ``[0, 1]`` (see the module's docstring)."""
    if isinstance(p, CategoricalParameter):
        i = [str(c) for c in p.choices].index(str(value))
        return (i + 0.5) / len(p.choices)
    if isinstance(p, FloatParameter) and p.log_scale:
        return (math.log(float(value)) - math.log(p.lower)) / (math.log(p.upper) - math.log(p.lower))
    return (float(value) - p.lower) / (p.upper - p.lower)


def check_mapping(base: SimProblem, parameters: list[Parameter | None] | list[Parameter],
                  inputs: dict[str, str], fixed: dict[str, float] | None = None,
                  outcomes: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Every problem with mapping ``base`` onto the campaign's ``parameters``, as ``(field, message)``
    pairs (``field`` relative to the ``simulator:`` block: ``map.temperature``); ``[]`` when sound.
    A ``None`` in ``parameters`` is one whose own problem is reported elsewhere."""
    issues: list[tuple[str, str]] = []
    names = [p.name for p in parameters if p is not None]
    by_input = {q.name: q for q in base.parameters}
    for q in base.parameters:
        assert isinstance(q, FloatParameter), f"{base.name}: mapped problems have float inputs"
    owner: dict[str, str] = {}
    for n, x in inputs.items():
        where = f"map.{n}"
        if n not in names:
            issues.append((where, f"{n!r} is not a parameter of the campaign (it has {names}); "
                                  "remove it or fix the name"))
        if x not in by_input:
            issues.append((where, f"{base.name} has no input {x!r}; its inputs are {list(by_input)}"))
        elif x in owner:
            issues.append((where, f"problem input {x!r} is mapped twice (from {owner[x]!r} and {n!r}); "
                                  "map each input from one parameter"))
        else:
            owner[x] = n
    free = [x for x in by_input if x not in owner]
    for n in names:
        if n not in inputs:
            hint = f", e.g. '{n}: {free[0]}'" if free else f" (all of {base.name}'s inputs are taken)"
            issues.append(("map", f"campaign parameter {n!r} is not mapped to an input of {base.name}; "
                                  f"add it to 'map'{hint}"))
    for x, v in (fixed or {}).items():
        where = f"fixed.{x}"
        q = by_input.get(x)
        if q is None:
            issues.append((where, f"{base.name} has no input {x!r}; its inputs are {list(by_input)}"))
        elif x in owner:
            issues.append((where, f"input {x!r} is mapped from parameter {owner[x]!r}, so it cannot also be "
                                  "fixed; remove one"))
        elif isinstance(v, bool) or not isinstance(v, int | float) or not q.lower <= v <= q.upper:
            issues.append((where, f"write a number within {x}'s bounds [{q.lower}, {q.upper}] (got {v!r})"))
    for name, src in (outcomes or {}).items():
        if src not in base.outcomes:
            issues.append((f"outcomes.{name}", f"{base.name} measures {base.outcomes}, not {src!r}; "
                                               f"write e.g. '{name}: {base.outcomes[0]}'"))
    return issues


def map_problem(base: SimProblem, parameters: list[Parameter], objectives: list[Objective],
                inputs: dict[str, str], fixed: dict[str, float] | None = None,
                outcomes: dict[str, str] | None = None,
                constraints: list[LinearConstraint] | tuple[()] = ()) -> SimProblem:
    """``base`` measured at the campaign's ``parameters`` and reporting the campaign's outcomes.

    ``inputs``: campaign parameter -> problem input; ``fixed``: problem input -> value for the
    inputs nobody sets (default: the midpoint of each); ``outcomes``: campaign outcome ->
    problem outcome (default: the problem's outcomes under their own names). ``objectives``
    decide the signs, ``constraints`` whether the optimum is still known (module docstring).
    """
    issues = check_mapping(base, parameters, inputs, fixed, outcomes)
    if issues:
        raise ProblemError("; ".join(f"{w}: {m}" for w, m in issues))
    outcomes = dict(outcomes or {o: o for o in base.outcomes})
    by_input = {q.name: q for q in base.parameters}
    held = {x: float((fixed or {}).get(x, (q.lower + q.upper) / 2)) for x, q in by_input.items()
            if x not in inputs.values()}
    goal_of = {o.name: o.goal for o in objectives}
    base_goal = {o.name: o.goal for o in base.objectives}
    sign = {}
    for name, src in outcomes.items():
        mine, theirs = goal_of.get(name), base_goal.get(src)
        opposed = {mine, theirs} == {"maximize", "minimize"}
        sign[name] = -1.0 if opposed else 1.0

    def to_problem(point: dict[str, Any]) -> dict[str, float]:
        x = dict(held)
        for p in parameters:
            q = by_input[inputs[p.name]]
            x[q.name] = q.lower + unit(p, point[p.name]) * (q.upper - q.lower)
        return x

    def evaluate(point: dict[str, Any]) -> dict[str, float]:
        y = base.evaluate(to_problem(point))
        return {name: sign[name] * y[src] for name, src in outcomes.items()}

    fails = None
    if base.fails is not None:
        base_fails = base.fails

        def fails(point: dict[str, Any]) -> bool:
            return base_fails(to_problem(point))

    reachable = not held and not constraints and all(isinstance(p, FloatParameter) for p in parameters)
    optimum: dict[str, float] = {}
    if reachable:
        for name, src in outcomes.items():
            if goal_of.get(name) == "target":
                continue  # the problem's optimum is not the target's
            if src in base.optimum:
                optimum[name] = sign[name] * base.optimum[src]
            if f"ref_{src}" in base.optimum:
                optimum[f"ref_{name}"] = sign[name] * base.optimum[f"ref_{src}"]
        if "hypervolume" in base.optimum and sorted(outcomes.values()) == sorted(base.outcomes) \
                and all(goal_of.get(n) in ("maximize", "minimize") for n in outcomes):
            optimum["hypervolume"] = base.optimum["hypervolume"]  # utilities are unchanged by the signs
    mapped_objectives = [
        Objective(name=name, goal=goal_of[name] if goal_of.get(name) in ("maximize", "minimize")
                  else base_goal.get(src, "minimize"))
        for name, src in outcomes.items()
    ]
    return SimProblem(
        name=base.name,
        parameters=list(parameters),
        outcomes=list(outcomes),
        evaluate=evaluate,
        objectives=mapped_objectives,
        optimum=optimum,
        source=f"{base.source}, mapped onto the campaign's parameters" if base.source else None,
        fails=fails,
    )
