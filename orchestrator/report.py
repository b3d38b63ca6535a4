"""What a campaign has found so far: the best trial, or the Pareto front for several objectives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from botorch.utils.multi_objective.hypervolume import Hypervolume, infer_reference_point
from botorch.utils.multi_objective.pareto import is_non_dominated

from planners.base import HistoryItem
from planners.space import Objective, OutcomeConstraint


@dataclass
class Best:
    """The campaign's best so far. One objective: ``value`` and ``parameters`` of the best
    feasible trial. Several: the Pareto front and its hypervolume."""

    value: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, float] = field(default_factory=dict)
    pareto: list[HistoryItem] = field(default_factory=list)
    hypervolume: float | None = None
    #: the hypervolume's reference point, in measured units: the one given, else the inferred one
    #: mapped back (for a ``target`` goal, the value above the target at the limiting distance;
    #: the value as far below it is equally good)
    reference_point: list[float] | None = None


def _feasible(h: HistoryItem, constraints: list[OutcomeConstraint]) -> bool:
    return all(c.name in h.outcomes and c.satisfied(h.outcomes[c.name]) for c in constraints)


def best_so_far(history: list[HistoryItem], objectives: list[Objective],
                constraints: list[OutcomeConstraint] | None = None,
                reference_point: list[float] | None = None) -> Best:
    """The best of ``history`` (completed, feasible trials only).

    ``reference_point`` is in outcome units (as measured, not as utilities);
    without it one is inferred from the observed front (BoTorch's heuristic).
    """
    done = [h for h in history if h.state == "completed"
            and all(o.name in h.outcomes for o in objectives) and _feasible(h, constraints or [])]
    if not done:
        return Best()
    if len(objectives) == 1:
        o = objectives[0]
        top = max(done, key=lambda h: float(o.utility(h.outcomes[o.name])))
        return Best(value=top.outcomes[o.name], parameters=top.parameters, outcomes=top.outcomes)
    U = torch.tensor([[float(o.utility(h.outcomes[o.name])) for o in objectives] for h in done],
                     dtype=torch.double)
    mask = is_non_dominated(U)
    pareto = [h for h, m in zip(done, mask.tolist(), strict=True) if m]
    if reference_point is not None:
        ref = torch.tensor([float(o.utility(r)) for o, r in zip(objectives, reference_point, strict=True)],
                           dtype=torch.double)
    else:
        ref = infer_reference_point(U[mask])
    hv = Hypervolume(ref_point=ref).compute(U[mask][(U[mask] > ref).all(dim=-1)]) \
        if (U[mask] > ref).all(dim=-1).any() else 0.0
    measured_ref = [float(r) for r in reference_point] if reference_point is not None else \
        [_measured(o, u) for o, u in zip(objectives, ref.tolist(), strict=True)]
    return Best(pareto=pareto, hypervolume=float(hv), reference_point=measured_ref)


def _measured(o: Objective, u: float) -> float:
    """The measured value whose utility is ``u`` (for a target: the one above the target)."""
    if o.goal == "maximize":
        return u
    if o.goal == "minimize":
        return -u
    return float(o.target) + abs(u)
