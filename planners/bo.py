"""Bayesian optimisation on BoTorch: a GP per outcome, log-noisy-EI or log-noisy-EHVI.

One objective: qLogNoisyExpectedImprovement (Ament et al., "Unexpected
Improvements to Expected Improvement for Bayesian Optimization", NeurIPS 2023).
Several: qLogNoisyExpectedHypervolumeImprovement (Daulton et al., "Parallel
Bayesian Optimization of Multiple Noisy Objectives with Expected Hypervolume
Improvement", NeurIPS 2021, with the log form of Ament et al.).
Outcome constraints enter as BoTorch constraint callables; running trials as
``X_pending``; linear constraints and sum-to-total fractions as the
inequality/equality constraints of ``optimize_acqf``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.acquisition.multi_objective.logei import (
    qLogNoisyExpectedHypervolumeImprovement,
)
from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
from botorch.acquisition.objective import GenericMCObjective
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.optim import optimize_acqf, optimize_acqf_mixed
from botorch.sampling import SobolQMCNormalSampler
from botorch.utils.multi_objective.hypervolume import infer_reference_point
from botorch.utils.sampling import manual_seed
from gpytorch.mlls import ExactMarginalLogLikelihood

from planners.base import HistoryItem, Planner, Problem, Proposal
from planners.baselines import sobol_points


def torch_device() -> torch.device:
    """``cuda`` when there is one, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BayesianPlanner(Planner):
    """BoTorch Bayesian optimisation behind the ``Planner`` interface.

    Options (``planner.options`` in a campaign file):
      - ``initial_trials`` (int, default 5): Sobol points before the first model.
      - ``num_restarts`` / ``raw_samples`` (8 / 256): acquisition optimiser budget.
      - ``mc_samples`` (128): quasi-Monte-Carlo samples of the acquisition.
      - ``max_categorical_combinations`` (24): one-hot assignments tried per proposal.
    """

    name = "bo"

    def __init__(
        self,
        problem: Problem,
        seed: int = 0,
        initial_trials: int = 5,
        num_restarts: int = 8,
        raw_samples: int = 256,
        mc_samples: int = 128,
        max_categorical_combinations: int = 24,
    ) -> None:
        super().__init__(problem, seed)
        if initial_trials < 1:
            raise ValueError("initial_trials must be at least 1")
        self.initial_trials = int(initial_trials)
        self.num_restarts = int(num_restarts)
        self.raw_samples = int(raw_samples)
        self.mc_samples = int(mc_samples)
        self.max_categorical_combinations = int(max_categorical_combinations)
        self.tkwargs: dict[str, Any] = {"device": torch_device(), "dtype": torch.double}

    # ---- helpers ---------------------------------------------------------
    def _utility(self, Y: torch.Tensor) -> torch.Tensor:
        """``... x m`` raw outcomes -> ``... x k`` objective utilities (larger is better)."""
        return torch.stack(
            [o.utility(Y[..., i]) for i, o in enumerate(self.problem.objectives)], dim=-1
        )

    def _constraints(self) -> list:
        names = self.problem.outcome_names

        def slack(c, i):  # bind c and i now, not when BoTorch calls it
            return lambda Z: c.slack(Z[..., i])

        return [slack(c, names.index(c.name)) for c in self.problem.outcome_constraints]

    def _fit(self, X: torch.Tensor, Y: torch.Tensor) -> SingleTaskGP:
        model = SingleTaskGP(X, Y, outcome_transform=Standardize(m=Y.shape[-1]))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        return model

    # ---- the interface ---------------------------------------------------
    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]]) -> list[Proposal]:
        space = self.problem.space
        names = self.problem.outcome_names
        completed = [
            h for h in history
            if h.state == "completed" and all(_finite(h.outcomes.get(k)) for k in names)
        ]
        seed = self.step_seed(history, pending)
        if len(completed) < self.initial_trials:
            X = sobol_points(space, n, self.seed, skip=len(history) + len(pending))
            return [Proposal(parameters=p, planner=self.name, seed=seed) for p in space.decode(X)]

        with manual_seed(seed):
            X = space.encode([h.parameters for h in completed]).to(**self.tkwargs)
            Y = torch.tensor(
                [[float(h.outcomes[k]) for k in names] for h in completed], **self.tkwargs
            )
            model = self._fit(X, Y)
            X_pending = space.encode(pending).to(**self.tkwargs) if pending else None
            acqf = self._acquisition(model, X, Y, X_pending, seed)
            candidates = self._optimize(acqf, n)
            legal = space.encode(space.decode(candidates)).to(**self.tkwargs)
            with torch.no_grad():
                post = model.posterior(legal)
                mean, var = post.mean, post.variance
                values = [float(acqf(legal[i : i + 1].unsqueeze(0))) for i in range(len(legal))]
        version = f"gp-{len(completed)}"
        out = []
        for i, params in enumerate(space.decode(legal)):
            out.append(
                Proposal(
                    parameters=params,
                    planner=self.name,
                    seed=seed,
                    predicted_mean={k: float(mean[i, j]) for j, k in enumerate(names)},
                    predicted_sd={k: float(var[i, j].clamp_min(0).sqrt()) for j, k in enumerate(names)},
                    acquisition_value=values[i],
                    model_version=version,
                )
            )
        return out

    def _acquisition(self, model, X, Y, X_pending, seed):
        sampler = SobolQMCNormalSampler(sample_shape=torch.Size([self.mc_samples]), seed=seed)
        constraints = self._constraints() or None
        k = len(self.problem.objectives)
        if k == 1:
            return qLogNoisyExpectedImprovement(
                model=model,
                X_baseline=X,
                sampler=sampler,
                objective=GenericMCObjective(lambda Z, X=None: self._utility(Z)[..., 0]),
                constraints=constraints,
                X_pending=X_pending,
                prune_baseline=True,
            )
        utilities = self._utility(Y)
        feasible = torch.ones(len(Y), dtype=torch.bool, device=Y.device)
        for c in self.problem.outcome_constraints:
            feasible &= c.slack(Y[:, self.problem.outcome_names.index(c.name)]) <= 0
        ref = infer_reference_point(utilities[feasible] if feasible.any() else utilities)
        return qLogNoisyExpectedHypervolumeImprovement(
            model=model,
            ref_point=ref.tolist(),
            X_baseline=X,
            sampler=sampler,
            objective=GenericMCMultiOutputObjective(lambda Z, X=None: self._utility(Z)),
            constraints=constraints,
            X_pending=X_pending,
            prune_baseline=True,
        )

    def _optimize(self, acqf, q: int) -> torch.Tensor:
        space = self.problem.space
        d = space.dim
        bounds = torch.stack([torch.zeros(d), torch.ones(d)]).to(**self.tkwargs)
        ineq, eq = space.linear_constraints_encoded()
        move = lambda cs: [(i.to(self.tkwargs["device"]), c.to(**self.tkwargs), r) for i, c, r in cs]  # noqa: E731
        common = dict(
            acq_function=acqf,
            bounds=bounds,
            q=q,
            num_restarts=self.num_restarts,
            raw_samples=self.raw_samples,
            inequality_constraints=move(ineq) or None,
            equality_constraints=move(eq) or None,
            options={"batch_limit": 8, "maxiter": 200},
        )
        combos = space.categorical_combinations
        if combos == [{}]:
            X, _ = optimize_acqf(**common, sequential=q > 1)
            return X
        if len(combos) > self.max_categorical_combinations:
            rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))
            combos = rng.sample(combos, self.max_categorical_combinations)
        X, _ = optimize_acqf_mixed(fixed_features_list=combos, **common)
        return X


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
