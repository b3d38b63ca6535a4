"""Baseline planners: uniform random, scrambled Sobol, Latin hypercube and grid.

They are also the initial design of the model-based planners. In pool mode
(a table that is the whole world) each picks untried rows: random uniformly,
the space-filling ones the untried row nearest to each of their points. Those
points are drawn in the unconstrained unit cube (:func:`design_space`): every
pool row already satisfies the constraints, and sampling a polytope by
hit-and-run on every call cost seconds per proposal on a fractions table.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from botorch.utils.sampling import get_polytope_samples
from scipy.stats import qmc
from torch.quasirandom import SobolEngine

from planners.base import HistoryItem, Planner, Problem, Proposal
from planners.space import CategoricalParameter, FloatParameter, IntParameter, SearchSpace


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


def design_space(problem: Problem) -> SearchSpace:
    """The space a space-filling design is drawn in: the problem's, or in pool mode the same
    parameters without the linear constraints (the pool's rows satisfy them already)."""
    space = problem.space
    if problem.pool is not None and space.constraints:
        return SearchSpace(parameters=space.parameters)
    return space


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

    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]],
            state: dict[str, Any] | None = None) -> list[Proposal]:
        seed = self.step_seed(history, pending)
        if self.problem.pool is not None:
            untried = self.untried_pool(history, pending)
            _check_pool_room(untried, n)
            picks = np.random.default_rng(seed).choice(untried, size=n, replace=False)
            return [Proposal(parameters=dict(self.problem.pool[int(i)]), planner=self.name, seed=seed)
                    for i in picks]
        X = sample_feasible(self.problem.space, n, seed)
        return [Proposal(parameters=p, planner=self.name, seed=seed) for p in self.problem.space.decode(X)]


class SobolPlanner(Planner):
    """The campaign's scrambled Sobol sequence, continued where the history left off."""

    name = "sobol"

    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]],
            state: dict[str, Any] | None = None) -> list[Proposal]:
        skip = len(history) + len(pending)
        X = sobol_points(design_space(self.problem), n, self.seed, skip=skip)
        return _proposals(self, X, history, pending, self.seed)


class LatinHypercubePlanner(Planner):
    """Latin hypercube designs (McKay, Beckman and Conover, Technometrics 21, 1979), taken in
    blocks of ``design_size`` points, each block a fresh optimised design (scipy's ``qmc``)."""

    name = "lhs"

    def __init__(self, problem: Problem, seed: int = 0, design_size: int = 20) -> None:
        super().__init__(problem, seed)
        if design_size < 2:
            raise ValueError("design_size must be at least 2")
        self.design_size = int(design_size)

    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]],
            state: dict[str, Any] | None = None) -> list[Proposal]:
        start = len(history) + len(pending)
        blocks = {}
        rows = []
        for k in range(start, start + n):
            b = k // self.design_size
            if b not in blocks:
                design = qmc.LatinHypercube(d=self.problem.space.dim, seed=self.seed * 7919 + b,
                                            optimization="random-cd").random(self.design_size)
                blocks[b] = design
            rows.append(blocks[b][k % self.design_size])
        X = torch.tensor(np.array(rows), dtype=torch.double)
        if design_space(self.problem).constraints:
            X = _nearest_feasible(self.problem.space, X, self.seed + start)
        return _proposals(self, X, history, pending, self.seed)


class GridPlanner(Planner):
    """A full-factorial grid (``levels`` values per float, every int and choice up to
    ``levels`` of them), visited in a seeded shuffled order; infeasible points are skipped."""

    name = "grid"

    def __init__(self, problem: Problem, seed: int = 0, levels: int = 5) -> None:
        super().__init__(problem, seed)
        if levels < 2:
            raise ValueError("levels must be at least 2")
        # In pool mode the grid's points are snapped to rows, which satisfy the constraints.
        space = design_space(problem)
        if any(c.op == "==" for c in space.constraints):
            raise ValueError("a grid cannot satisfy an equality (fractions) constraint; use planner 'sobol' "
                             "or 'random' instead")
        axes = []
        for p in problem.space.parameters:
            if isinstance(p, FloatParameter):
                axes.append(list(np.linspace(p.lower, p.upper, levels)))
            elif isinstance(p, IntParameter):
                axes.append(sorted({int(round(v)) for v in np.linspace(p.lower, p.upper, levels)}))
            else:
                assert isinstance(p, CategoricalParameter)
                axes.append(list(p.choices))
        names = problem.space.names
        points = [dict(zip(names, (float(v) if isinstance(v, np.floating) else v for v in combo), strict=True))
                  for combo in itertools.product(*axes)]
        points = [q for q in points if space.is_feasible(q)]
        order = np.random.default_rng(seed).permutation(len(points))
        self.points = [points[i] for i in order]

    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]],
            state: dict[str, Any] | None = None) -> list[Proposal]:
        start = len(history) + len(pending)
        if self.problem.pool is not None:
            X = self.problem.space.encode([self.points[k % len(self.points)] for k in range(start, start + n)])
            return _proposals(self, X, history, pending, self.seed)
        if start + n > len(self.points):
            raise ValueError(f"the grid has {len(self.points)} points and {start} are used; raise 'levels'")
        return [Proposal(parameters=dict(self.points[k]), planner=self.name, seed=self.seed)
                for k in range(start, start + n)]


def _check_pool_room(untried: list[int], n: int) -> None:
    if len(untried) < n:
        raise ValueError(f"the pool has {len(untried)} untried rows, fewer than the {n} asked for")


def snap_to_pool(problem: Problem, X: torch.Tensor, untried: list[int]) -> list[int]:
    """For each encoded point of ``X`` (``n x d``), the nearest untried pool row, each row once."""
    _check_pool_room(untried, len(X))
    assert problem.pool is not None
    P = problem.space.encode([problem.pool[i] for i in untried])
    dist = torch.cdist(X.to(P), P)
    chosen: list[int] = []
    for i in range(len(X)):
        order = torch.argsort(dist[i])
        j = next(int(j) for j in order if untried[int(j)] not in chosen)
        chosen.append(untried[j])
    return chosen


def _proposals(planner: Planner, X: torch.Tensor, history, pending, seed: int) -> list[Proposal]:
    """Decode ``X`` to proposals, snapping to untried pool rows in pool mode."""
    problem = planner.problem
    if problem.pool is not None:
        rows = snap_to_pool(problem, X, planner.untried_pool(history, pending))
        return [Proposal(parameters=dict(problem.pool[i]), planner=planner.name, seed=seed) for i in rows]
    return [Proposal(parameters=p, planner=planner.name, seed=seed) for p in problem.space.decode(X)]


def _nearest_feasible(space: SearchSpace, X: torch.Tensor, seed: int) -> torch.Tensor:
    """Replace each row of ``X`` by the nearest of many feasible samples (keeps the design's spread)."""
    cloud = sample_feasible(space, 2048, seed)
    return cloud[torch.cdist(X, cloud).argmin(dim=1)]
