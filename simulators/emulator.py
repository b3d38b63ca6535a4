"""An emulator: past experiments as an instrument, measured by sampling a model fitted to them.

In the spirit of Olympus's emulators (Häse et al., "Olympus: a benchmarking framework for
noisy optimization and experiment planning", Mach. Learn.: Sci. Technol. 2, 035021 (2021)):
a model fitted to a table of experiments (or a past campaign's completed trials) stands in for
the instrument, and each measurement is a draw from the model's predictive distribution for a
new observation, so a rehearsal is as noisy as the experiments were.

This module checks the rows and turns a fitted model into a
:class:`~simulators.problems.SimProblem`; the model is passed in (any object with the
``predict(X) -> (mean, var)`` of ``planners.surrogates``), so the simulators import nothing of
the planners but their space types (DESIGN.md). ``orchestrator.rehearsal`` fits it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from planners.space import CategoricalParameter, Objective, Parameter, SearchSpace
from simulators.problems import ProblemError, SimProblem

#: The fewest usable rows an emulator is fitted to, and the fewest per encoded dimension.
MIN_ROWS, MIN_ROWS_PER_DIM = 5, 2
#: A campaign bound further than this share of its range beyond the data's extreme row is
#: warned about: the model is guessing (its prior) there.
EXTRAPOLATION_SLACK = 0.1


def read_table(path: str | Path, columns: list[str]) -> pd.DataFrame:
    """The rows of the CSV file ``path`` (a header row naming its columns), checked to hold
    every name in ``columns``; ``ProblemError`` saying what to fix otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ProblemError(f"no such file {str(p)!r}; give the path of a CSV table (relative to the "
                           "campaign file) whose header names the campaign's parameters and outcomes")
    try:
        frame = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ProblemError(f"{p}: not a readable CSV table ({exc}); write one row per experiment "
                           "under a header row") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ProblemError(f"{p}: has no column {missing} (its columns are {list(frame.columns)}); name "
                           "the columns as the campaign's parameters and outcomes")
    return frame


def usable_rows(frame: pd.DataFrame, parameters: list[Parameter], outcomes: list[str],
                source: str) -> tuple[list[dict[str, Any]], np.ndarray, list[str]]:
    """The rows of ``frame`` an emulator learns from: every parameter inside the campaign's
    bounds or choices and every outcome a finite number (others are left out: a failed
    experiment, a wider past campaign).

    Returns ``(points, Y: n x m, warnings)``; ``ProblemError`` when too few rows are left.
    """
    space = SearchSpace(parameters=parameters)
    keep = np.ones(len(frame), dtype=bool)
    why: dict[str, int] = {}
    points: list[dict[str, Any]] = [{} for _ in range(len(frame))]
    for p in parameters:
        column = frame[p.name]
        if isinstance(p, CategoricalParameter):
            by_text = {str(c): c for c in p.choices}
            ok = column.astype(str).isin(by_text).to_numpy()
            values = [by_text.get(str(v)) for v in column]
        else:
            numbers = pd.to_numeric(column, errors="coerce").to_numpy(float)
            slack = 1e-9 * (p.upper - p.lower)
            ok = np.isfinite(numbers) & (numbers >= p.lower - slack) & (numbers <= p.upper + slack)
            numbers = np.clip(numbers, p.lower, p.upper)
            if p.type == "int":
                ok &= np.isfinite(numbers) & (np.round(numbers) == numbers)
                values = [int(v) if np.isfinite(v) else None for v in numbers]
            else:
                values = list(numbers)
        if (~ok & keep).any():
            why[f"{p.name} outside the campaign's {'choices' if p.type == 'categorical' else 'bounds'}"] = \
                int((~ok & keep).sum())
        keep &= ok
        for i, v in enumerate(values):
            points[i][p.name] = v
    Y = np.stack([pd.to_numeric(frame[o], errors="coerce").to_numpy(float) for o in outcomes], axis=1) \
        if len(frame) else np.zeros((0, len(outcomes)))
    finite = np.isfinite(Y).all(axis=1)
    if (~finite & keep).any():
        why["an outcome blank or not a number"] = int((~finite & keep).sum())
    keep &= finite
    needed = max(MIN_ROWS, MIN_ROWS_PER_DIM * space.dim)
    left_out = "; ".join(f"{n} with {w}" for w, n in why.items())
    if keep.sum() < needed:
        raise ProblemError(f"{source}: {int(keep.sum())} of its {len(frame)} rows are usable"
                           + (f" ({left_out})" if left_out else "")
                           + f"; an emulator of {space.dim} encoded dimensions needs at least {needed}: "
                           "add rows, or widen the campaign's bounds to the data's")
    kept = [pt for pt, k in zip(points, keep, strict=True) if k]
    warnings = [f"{source}: left out {left_out}"] if left_out else []
    warnings += _coverage_warnings(kept, parameters, source)
    return kept, Y[keep], warnings


def _coverage_warnings(points: list[dict[str, Any]], parameters: list[Parameter], source: str) -> list[str]:
    """Where the campaign may go and the data never went: the emulator extrapolates there."""
    from simulators.rehearsal import unit

    out = []
    for p in parameters:
        if isinstance(p, CategoricalParameter):
            seen = {str(pt[p.name]) for pt in points}
            unseen = [c for c in p.choices if str(c) not in seen]
            if unseen:
                out.append(f"{source}: no row has {p.name} = {unseen}; the emulator guesses there")
            continue
        u = [unit(p, pt[p.name]) for pt in points]
        if min(u) > EXTRAPOLATION_SLACK or max(u) < 1 - EXTRAPOLATION_SLACK:
            lo, hi = min(pt[p.name] for pt in points), max(pt[p.name] for pt in points)
            out.append(f"{source}: {p.name} spans [{p.lower}, {p.upper}] in the campaign but "
                       f"[{lo:.4g}, {hi:.4g}] in the data; the emulator extrapolates beyond (narrow the "
                       "bounds to trust it)")
    return out


def emulated_problem(model: Any, parameters: list[Parameter], outcomes: list[str], *, noise: bool = True,
                     seed: int = 0, objectives: list[Objective] | None = None, name: str = "emulator",
                     source: str | None = None) -> SimProblem:
    """A problem measured by ``model`` (fitted on ``SearchSpace(parameters).encode(points)`` and
    ``Y: n x m`` in ``outcomes``' order): each measurement at a point is its predictive mean
    plus, with ``noise``, a Gaussian draw of its predictive standard deviation for a new
    observation (model uncertainty and fitted noise), from a generator seeded with ``seed``."""
    import torch

    space = SearchSpace(parameters=parameters)
    rng = np.random.default_rng(seed)
    lock = threading.Lock()

    def evaluate(point: dict[str, Any]) -> dict[str, float]:
        X = space.encode([point])  # 1 x d
        with lock:
            mean, var = model.predict(X, observation_noise=True)  # each 1 x m
            draw = rng.normal(size=len(outcomes))
        mean = mean.reshape(-1).cpu().numpy()
        sd = torch.as_tensor(var).clamp_min(0).sqrt().reshape(-1).cpu().numpy()
        values = mean + sd * draw if noise else mean
        return {o: float(values[i]) for i, o in enumerate(outcomes)}

    return SimProblem(name=name, parameters=list(parameters), outcomes=list(outcomes), evaluate=evaluate,
                      objectives=list(objectives or []), optimum={}, source=source)
