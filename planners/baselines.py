"""Baseline planners: uniform random and scrambled Sobol, also the initial design of others."""

from __future__ import annotations

from typing import Any

import torch
from botorch.utils.sampling import get_polytope_samples
from torch.quasirandom import SobolEngine

from planners.base import HistoryItem, Planner, Proposal
from planners.space import SearchSpace


def sample_feasible(space: SearchSpace, n: int, seed: int) -> torch.Tensor:
    """``n x d`` uniform draws in the unit cube that satisfy the space's linear constraints.

    Without constraints these are plain uniform draws; with them, hit-and-run
    samples of the polytope (BoTorch's ``get_polytope_samples``), which also
    handles fractions that must add to a total.
    """
    d = space.dim
    ineq, eq = space.linear_constraints_encoded()
    if not ineq and not eq:
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(n, d, generator=gen, dtype=torch.double)
    bounds = torch.stack([torch.zeros(d), torch.ones(d)]).double()
    X = get_polytope_samples(
        n=n,
        bounds=bounds,
        inequality_constraints=ineq or None,
        equality_constraints=eq or None,
        seed=seed,
        n_thinning=16,
    )
    return X.clamp(0, 1)


def sobol_points(space: SearchSpace, n: int, seed: int, skip: int = 0) -> torch.Tensor:
    """``n x d`` scrambled Sobol points after the first ``skip``; constrained spaces fall back
    to :func:`sample_feasible` (a Sobol net does not survive a linear constraint)."""
    if space.constraints:
        return sample_feasible(space, n, seed * 1_000_003 + skip)  # no overlap between seeds
    engine = SobolEngine(space.dim, scramble=True, seed=seed)
    if skip:
        engine.fast_forward(skip)
    return engine.draw(n, dtype=torch.double)


class RandomPlanner(Planner):
    """Uniform random proposals (feasible under the linear constraints)."""

    name = "random"

    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]]) -> list[Proposal]:
        seed = self.step_seed(history, pending)
        X = sample_feasible(self.problem.space, n, seed)
        return [Proposal(parameters=p, planner=self.name, seed=seed) for p in self.problem.space.decode(X)]


class SobolPlanner(Planner):
    """The campaign's scrambled Sobol sequence, continued where the history left off."""

    name = "sobol"

    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]]) -> list[Proposal]:
        skip = len(history) + len(pending)
        X = sobol_points(self.problem.space, n, self.seed, skip=skip)
        return [
            Proposal(parameters=p, planner=self.name, seed=self.seed)
            for p in self.problem.space.decode(X)
        ]
