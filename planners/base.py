"""The planner interface: ``ask(n, history, pending) -> proposals``, and what it trades in."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

from planners.space import Objective, OutcomeConstraint, SearchSpace


@dataclass(frozen=True)
class HistoryItem:
    """One finished trial as a planner sees it.

    ``state`` is ``completed`` (``outcomes`` holds the measurements),
    ``failed`` (the experiment failed there: data about where not to go) or
    ``abandoned`` (it reached an instrument and yielded no result: tried, so not
    to be proposed again by accident, and a step of a sequence design, but no
    evidence about the point either way).
    """

    parameters: dict[str, Any]
    state: Literal["completed", "failed", "abandoned"]
    outcomes: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Proposal:
    """What a planner returns for one trial."""

    parameters: dict[str, Any]
    planner: str
    seed: int
    predicted_mean: dict[str, float] = field(default_factory=dict)
    predicted_sd: dict[str, float] = field(default_factory=dict)
    acquisition_value: float | None = None
    model_version: str | None = None
    #: results the model version had not been trained on when it made this proposal
    model_unseen: int | None = None
    #: distance of the point from the data the model has seen (~1: the data's own spacing)
    ood_score: float | None = None
    #: what the planner's next ask may start from (plain JSON: e.g. the GP hyperparameters
    #: this proposal was made with); the ledger records it and hands it back as ``ask(...,
    #: state=...)``, so a warm-started planner is a function of the ledger, not of its past
    model_state: dict[str, Any] | None = None


@dataclass(frozen=True)
class Problem:
    """Everything a planner needs to know about what it optimises."""

    space: SearchSpace
    objectives: list[Objective]
    outcome_constraints: list[OutcomeConstraint] = field(default_factory=list)
    #: The rows a planner may choose from, for a table that is the whole world
    #: (``kind: pool``); ``None`` for a continuous search space.
    pool: tuple[dict[str, Any], ...] | None = None

    @property
    def outcome_names(self) -> list[str]:
        """Objectives first, then constrained outcomes, each once."""
        names = [o.name for o in self.objectives]
        names += [c.name for c in self.outcome_constraints if c.name not in names]
        return names


class Planner(ABC):
    """Decides what to run next.

    A planner is pure with respect to storage: ``ask`` sees only the history
    and pending points it is given, and with the same history and seed it
    returns the same proposals.
    """

    name: str = "planner"

    def __init__(self, problem: Problem, seed: int = 0, **options: Any) -> None:
        if options:
            raise ValueError(
                f"planner {self.name!r} takes no options {sorted(options)}; "
                f"remove them from 'planner.options'"
            )
        self.problem = problem
        self.seed = int(seed)

    @abstractmethod
    def ask(
        self,
        n: int,
        history: list[HistoryItem],
        pending: list[dict[str, Any]],
        state: dict[str, Any] | None = None,
    ) -> list[Proposal]:
        """Propose ``n`` trials given the finished ``history`` and the ``pending`` (running) points.

        ``state`` is the ``model_state`` of the campaign's latest proposal (``None`` for the
        first, or when it had none): all a planner may carry from one ask to the next. A
        planner holds no other state between asks, so the same arguments give the same
        proposals in a long-lived planner and in a fresh one rebuilt from the ledger.
        """

    def untried_pool(self, history: list[HistoryItem], pending: list[dict[str, Any]]) -> list[int]:
        """Indices of the pool rows neither in ``history`` nor ``pending`` (pool mode only)."""
        assert self.problem.pool is not None, "untried_pool needs a problem with a pool"
        seen = {row_key(h.parameters) for h in history} | {row_key(p) for p in pending}
        return [i for i, row in enumerate(self.problem.pool) if row_key(row) not in seen]

    def completed(self, history: list[HistoryItem]) -> list[HistoryItem]:
        """The completed trials with a finite value for every outcome the planner models."""
        names = self.problem.outcome_names
        return [h for h in history
                if h.state == "completed" and all(finite(h.outcomes.get(k)) for k in names)]

    def model_proposals(self, params: list[dict[str, Any]], seed: int, mean, sd,
                        values: list[float], version: str, unseen: int | None = None,
                        ood: list[float] | None = None,
                        state: dict[str, Any] | None = None) -> list[Proposal]:
        """Proposals from a model: ``mean``/``sd`` are ``len(params) x outcomes`` arrays in
        measured units, in the order of :attr:`Problem.outcome_names`; ``unseen`` results the
        model had not been trained on; ``ood`` the out-of-domain score of each point."""
        names = self.problem.outcome_names
        return [
            Proposal(
                parameters=p, planner=self.name, seed=seed,
                predicted_mean={k: float(mean[i][j]) for j, k in enumerate(names)},
                predicted_sd={k: float(sd[i][j]) for j, k in enumerate(names)},
                acquisition_value=float(values[i]), model_version=version, model_unseen=unseen,
                ood_score=None if ood is None else float(ood[i]), model_state=state,
            )
            for i, p in enumerate(params)
        ]

    def step_seed(self, history: list[HistoryItem], pending: list[dict[str, Any]]) -> int:
        """A seed for this call: fixed by the campaign seed and how far the campaign has got."""
        return self.seed * 1_000_003 + 7919 * len(history) + len(pending)


def finite(value: Any) -> bool:
    """``value`` is a number and not NaN or infinite."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def row_key(point: dict[str, Any]) -> tuple:
    """A hashable identity of a point, tolerant of float round-off (pool rows, repeats)."""
    return tuple(sorted((k, round(v, 9) if isinstance(v, float) else str(v)) for k, v in point.items()))
