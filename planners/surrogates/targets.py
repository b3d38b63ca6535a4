"""What a surrogate learns: measured outcomes turned into the model's outputs, and back.

Shared by the BO planner and the surrogate trainer, so a model the trainer fits
is a model the planner can use as it is. Outputs, in order:

  - one per objective: its *utility* (larger is better) with the bad tail
    log-compressed (:func:`tail_warp`), so a few disastrous experiments do not
    flatten the model where the good ones are; a ``target`` objective raw;
  - one per outcome constraint: the outcome raw.

The warp is fitted on one set of results and then frozen (:class:`TargetMap`),
so a new result can be put on the same scale as the prediction made for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from planners.base import Problem


def tail_warp(u: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
    """Warp utilities (``n``, larger is better): centre on the median, scale by the spread,
    and log-compress only the side below the median. Returns the warped values and the
    ``(centre, scale)`` that :func:`tail_unwarp` needs. Monotone, so the best stays best."""
    centre = float(u.median())
    mad = float((u - centre).abs().median()) * 1.4826
    scale = mad if mad > 1e-12 else float(u.std()) if len(u) > 1 and float(u.std()) > 1e-12 else 1.0
    return warp_with(u, centre, scale), (centre, scale)


def warp_with(u: torch.Tensor, centre: float, scale: float) -> torch.Tensor:
    """:func:`tail_warp` with a frozen ``(centre, scale)``."""
    z = (u - centre) / scale
    return torch.where(z >= 0, z, -torch.log1p(-z.clamp(max=0)))


def tail_unwarp(w: torch.Tensor, centre: float, scale: float) -> torch.Tensor:
    """Inverse of :func:`tail_warp`."""
    z = torch.where(w >= 0, w, -torch.expm1(-w.clamp(max=0)))
    return centre + scale * z


@dataclass(frozen=True)
class Column:
    """One model output: which outcome, and how it was transformed (``warp`` is
    ``(centre, scale)`` for a warped objective utility, ``None`` for a raw value)."""

    outcome: str
    goal: str  # "maximize", "minimize", "target" or "constraint"
    warp: tuple[float, float] | None


@dataclass(frozen=True)
class TargetMap:
    """The frozen map from measured outcomes to model outputs (``m`` columns)."""

    columns: tuple[Column, ...]

    @property
    def m(self) -> int:
        return len(self.columns)

    @classmethod
    def fit(cls, problem: Problem, outcomes: list[dict[str, float]]) -> tuple[TargetMap, torch.Tensor]:
        """Fit the warp on ``outcomes`` (one dict per result); return the map and the model
        outputs ``n x m`` (double)."""
        cols, values = [], []
        for o in problem.objectives:
            raw = torch.tensor([float(r[o.name]) for r in outcomes], dtype=torch.double)
            if o.goal == "target":
                cols.append(Column(o.name, "target", None))
                values.append(raw)
            else:
                w, cs = tail_warp(o.utility(raw))
                cols.append(Column(o.name, o.goal, cs))
                values.append(w)
        for c in problem.outcome_constraints:
            cols.append(Column(c.name, "constraint", None))
            values.append(torch.tensor([float(r[c.name]) for r in outcomes], dtype=torch.double))
        return cls(tuple(cols)), torch.stack(values, dim=-1)

    def to_model(self, outcomes: list[dict[str, float]]) -> torch.Tensor:
        """Measured outcomes -> model outputs ``n x m`` with this (frozen) map."""
        out = []
        for col in self.columns:
            raw = torch.tensor([float(r[col.outcome]) for r in outcomes], dtype=torch.double)
            if col.warp is not None:
                raw = warp_with(raw if col.goal == "maximize" else -raw, *col.warp)
            out.append(raw)
        return torch.stack(out, dim=-1)

    def to_measured(self, Z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model outputs (or samples of them), ``... x m`` -> measured values by outcome
        (each ``...``); an outcome that is both objective and constraint is taken from its
        objective column."""
        out: dict[str, torch.Tensor] = {}
        for i, col in enumerate(self.columns):
            if col.outcome in out:
                continue
            z = Z[..., i]
            if col.warp is not None:
                u = tail_unwarp(z, *col.warp)
                z = u if col.goal == "maximize" else -u
            out[col.outcome] = z
        return out

    def as_dict(self) -> list[dict[str, Any]]:
        return [{"outcome": c.outcome, "goal": c.goal, "warp": list(c.warp) if c.warp else None}
                for c in self.columns]

    @classmethod
    def from_dict(cls, data: list[dict[str, Any]]) -> TargetMap:
        return cls(tuple(Column(d["outcome"], d["goal"], tuple(d["warp"]) if d["warp"] else None)
                         for d in data))
