"""The data every campaign plot is drawn from, shared by the page (``/api/.../figures``) and
``labpilot report`` (plotly and matplotlib): one place decides what "best so far" means."""

from __future__ import annotations

import math
from typing import Any

from orchestrator.ledger import Ledger

CALIBRATION_KEYS = ("coverage_68", "coverage_95", "nll")


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _utility(goal: str, target: float | None, v: float) -> float:
    if goal == "maximize":
        return v
    if goal == "minimize":
        return -v
    return -abs(v - float(target or 0.0))


def _feasible(outcomes: dict[str, Any], constraints: list[Any]) -> bool:
    for c in constraints:
        v = _num(outcomes.get(c.name))
        if v is None or not c.satisfied(v):
            return False
    return True


def pareto_front(points: list[tuple[int, list[float]]]) -> list[int]:
    """Keys of the non-dominated points (utilities: larger is better in every coordinate)."""
    front = []
    for k, u in points:
        dominated = any(all(a >= b for a, b in zip(w, u, strict=True)) and any(a > b for a, b in zip(w, u, strict=True))
                        for j, w in points if j != k)
        if not dominated:
            front.append(k)
    return front


def figure_data(ledger: Ledger, campaign_id: int, spec: Any) -> dict[str, Any]:
    """Everything the plots need, as plain JSON (see ``schemas.FiguresOut``)."""
    objectives = [{"name": o.name, "goal": o.goal, "target": o.target} for o in spec.objectives]
    params = [p.name for p in spec.parameters]
    outcomes = spec.outcome_names
    constraints = list(spec.outcome_constraints)
    trials = ledger.trials(campaign_id)
    done = [t for t in trials if t.state == "completed" and t.observation is not None]
    values: dict[str, list[float | None]] = {o: [_num(t.observation.values.get(o)) for t in done] for o in outcomes}
    best: list[float | None] = []
    o0 = objectives[0]
    top_u: float | None = None
    top_v: float | None = None
    for t in done:
        v = _num(t.observation.values.get(o0["name"]))
        if v is not None and _feasible(t.observation.values, constraints):
            u = _utility(o0["goal"], o0["target"], v)
            if top_u is None or u > top_u:
                top_u, top_v = u, v
        best.append(top_v)
    pareto: list[int] = []
    if len(objectives) >= 2:
        pts = []
        for t in done:
            vs = [_num(t.observation.values.get(o["name"])) for o in objectives]
            if all(v is not None for v in vs) and _feasible(t.observation.values, constraints):
                pts.append((t.number, [_utility(o["goal"], o["target"], v)
                                       for o, v in zip(objectives, vs, strict=True)]))
        pareto = pareto_front(pts)
    shown = [t for t in trials if t.state not in ("proposed",) or t.awaiting]
    param_values = {p: [t.parameters.get(p) for t in shown] for p in params}
    models = ledger.model_versions(campaign_id)
    calibration: dict[str, list[float | None]] = {k: [] for k in CALIBRATION_KEYS}
    for m in models:
        cal = m.calibration or {}
        src = cal.get("overall") if isinstance(cal.get("overall"), dict) else cal
        for k in CALIBRATION_KEYS:
            calibration[k].append(_num(src.get(k)))
    return {
        "objectives": objectives, "parameters": params, "trials": [t.number for t in done],
        "values": values, "best_so_far": best, "param_values": param_values,
        "param_trials": [t.number for t in shown], "param_states": [t.state for t in shown],
        "pareto": pareto, "calibration": calibration, "model_numbers": [m.number for m in models],
    }


def best_of(data: dict[str, Any]) -> dict[str, Any] | None:
    """The best value of the first objective and its trial, from :func:`figure_data`."""
    if not data["best_so_far"] or data["best_so_far"][-1] is None:
        return None
    value = data["best_so_far"][-1]
    name = data["objectives"][0]["name"]
    for n, v in zip(data["trials"], data["values"][name], strict=True):
        if v == value:
            return {"objective": name, "value": value, "trial": n}
    return {"objective": name, "value": value, "trial": None}
