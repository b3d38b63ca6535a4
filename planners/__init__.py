"""Everything that decides what to run next: baselines, Bayesian optimisation, and more."""

from __future__ import annotations

from typing import Any

from planners.base import HistoryItem, Planner, Problem, Proposal

PLANNERS: dict[str, str] = {
    "random": "planners.baselines:RandomPlanner",
    "sobol": "planners.baselines:SobolPlanner",
    "lhs": "planners.baselines:LatinHypercubePlanner",
    "grid": "planners.baselines:GridPlanner",
    "bo": "planners.bo:BayesianPlanner",
    "ax": "planners.ax_adapter:AxPlanner",
    "rl": "planners.rl:RLPlanner",
}


def make_planner(name: str, problem: Problem, seed: int = 0, options: dict[str, Any] | None = None) -> Planner:
    """Build the planner called ``name``; unknown names and options raise ``ValueError``."""
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; choose one of {sorted(PLANNERS)}")
    import importlib

    module, cls = PLANNERS[name].split(":")
    planner_cls = getattr(importlib.import_module(module), cls)
    try:
        return planner_cls(problem, seed=seed, **(options or {}))
    except TypeError as exc:
        raise ValueError(f"planner {name!r}: bad option ({exc}); see its docstring for options") from exc


__all__ = ["HistoryItem", "Planner", "Problem", "Proposal", "PLANNERS", "make_planner"]
