"""Bayesian optimisation on BoTorch: GPs on the outcomes, log-noisy-EI or log-noisy-EHVI.

One objective: qLogNoisyExpectedImprovement (Ament et al., "Unexpected
Improvements to Expected Improvement for Bayesian Optimization", NeurIPS 2023).
Several: qLogNoisyExpectedHypervolumeImprovement (Daulton et al., "Parallel
Bayesian Optimization of Multiple Noisy Objectives with Expected Hypervolume
Improvement", NeurIPS 2021, in the log form of Ament et al.).

What the model sees (all composed, nothing hidden in the search space):
  - each objective as a *utility* (larger is better) with its bad tail
    log-compressed (:func:`tail_warp`), so a few disastrous experiments do not
    flatten the model where the good ones are; a ``target`` objective is
    modelled raw and scored as ``-|y - target|`` in the acquisition's objective;
  - each constrained outcome raw, entering as a BoTorch constraint callable;
  - when some trials failed, a second GP on success (1) / failure (0) over all
    trials, entering as the constraint "predicted success >= 0.5", so the
    acquisition avoids regions where experiments fail (Gelbart, Snoek and
    Adams, "Bayesian Optimization with Unknown Constraints", UAI 2014, with a
    GP-regression stand-in for the classifier);
  - running trials as ``X_pending``; linear constraints and sum-to-total
    fractions as the inequality/equality constraints of ``optimize_acqf``;
    categoricals one-hot, optimised over their combinations with
    ``optimize_acqf_mixed``; integers relaxed and rounded (the proposal is
    always a legal value, and the prediction is made at that legal value);
  - in pool mode (a table that is the whole world) the acquisition is
    maximised over the untried rows with ``optimize_acqf_discrete``.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import gpytorch
import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.acquisition.multi_objective.logei import (
    qLogNoisyExpectedHypervolumeImprovement,
)
from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
from botorch.acquisition.objective import GenericMCObjective
from botorch.exceptions.warnings import BotorchWarning, InputDataWarning, OptimizationWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import ModelListGP, SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.optim import optimize_acqf, optimize_acqf_discrete, optimize_acqf_mixed
from botorch.optim.initializers import sample_q_batches_from_polytope
from botorch.sampling import SobolQMCNormalSampler
from botorch.sampling.get_sampler import get_sampler
from botorch.utils.multi_objective.hypervolume import infer_reference_point
from botorch.utils.sampling import manual_seed
from gpytorch.mlls import ExactMarginalLogLikelihood
from torch.quasirandom import SobolEngine

from planners.base import HistoryItem, Planner, Problem, Proposal
from planners.baselines import _proposals, design_space, sobol_points
from planners.surrogates import ExactGP, inflate, ood_score, resolve_device
from planners.surrogates.targets import TargetMap, tail_unwarp, tail_warp, warp_with


def torch_device() -> torch.device:
    """``cuda`` when there is one, the CPU otherwise."""
    return resolve_device()


class BayesianPlanner(Planner):
    """BoTorch Bayesian optimisation behind the ``Planner`` interface.

    Options (``planner.options`` in a campaign file):
      - ``initial_trials`` (int, default 5): Sobol points before the first model.
      - ``num_restarts`` / ``raw_samples`` (4 / 128): acquisition optimiser budget.
      - ``mc_samples`` (128): quasi-Monte-Carlo samples of the acquisition.
      - ``max_categorical_combinations`` (24): one-hot assignments tried per proposal.
      - ``feasibility_model`` (true): learn where experiments fail from failed trials.
      - ``reference_point`` (none): for several objectives, the outcome values (as
        measured) below which a result is worthless; inferred from the data if absent.
      - ``maxiter`` (100): iterations of each acquisition-optimiser restart.
      - ``sequential`` (true): a batch chosen one point at a time (greedy), else jointly.
      - ``fit_maxiter`` (50): L-BFGS iterations of the GP fit (the marginal likelihood
        it reaches matched an unlimited fit to 4 digits on Hartmann6 at 35 and 100 points).
      - ``warm_start`` (true): when no surrogate trainer serves this planner, refit its GP from
        the hyperparameters of the previous ask (at most ``update_maxiter`` L-BFGS iterations,
        10) instead of from BoTorch's initial values. Those hyperparameters travel as the
        proposal's ``model_state``, which the ledger records and hands back as ``ask(...,
        state=...)``: the planner keeps nothing between asks, so a fresh planner given the
        ledger's history and state proposes exactly what the long-lived one did. This is what
        the surrogate trainer does for a campaign; on Branin it halved the proposal time and the
        regret (benchmarks/RESULTS.md). Without a state (the first model-based ask) it is a
        full fit. A planner serving a trainer fits cold when the trainer has no version yet,
        so a campaign's decisions replay from its ledger and checkpoints alone.
      - ``max_widening`` (1.5): when the trainer's version reports that its recent 95 %
        intervals covered clearly less than 95 %, the posterior's spread is multiplied by the
        version's inflation factor, capped at this (so the acquisition explores more); 1 turns
        the widening off. Exploration has a price at small budgets: on Hartmann6 at 35 trials the
        campaign path's median regret was 0.084 unwidened, 0.18 capped at 1.5 and 0.29 uncapped
        (benchmarks/RESULTS.md); on Branin it never triggered.
    """

    name = "bo"

    def __init__(
        self,
        problem: Problem,
        seed: int = 0,
        initial_trials: int = 5,
        num_restarts: int = 4,
        raw_samples: int = 128,
        mc_samples: int = 128,
        max_categorical_combinations: int = 24,
        feasibility_model: bool = True,
        reference_point: list[float] | None = None,
        maxiter: int = 100,
        sequential: bool = True,
        fit_maxiter: int = 50,
        warm_start: bool = True,
        update_maxiter: int = 10,
        max_widening: float = 1.5,
    ) -> None:
        super().__init__(problem, seed)
        if initial_trials < 1:
            raise ValueError("initial_trials must be at least 1")
        if reference_point is not None and len(reference_point) != len(problem.objectives):
            raise ValueError(f"reference_point needs one value per objective ({len(problem.objectives)})")
        self.initial_trials = int(initial_trials)
        self.num_restarts = int(num_restarts)
        self.raw_samples = int(raw_samples)
        self.mc_samples = int(mc_samples)
        self.max_categorical_combinations = int(max_categorical_combinations)
        self.feasibility_model = bool(feasibility_model)
        self.reference_point = reference_point
        self.maxiter = int(maxiter)
        # Greedy one-at-a-time batches: in a test with a failing region, a joint optimisation
        # of 6 points put 3 of them in the failing region, the greedy one 1 (4 restarts each).
        self.sequential = bool(sequential)
        self.fit_maxiter = int(fit_maxiter)
        self.warm_start = bool(warm_start)
        if int(update_maxiter) < 1:
            raise ValueError("update_maxiter must be at least 1")
        self.update_maxiter = int(update_maxiter)
        if not float(max_widening) >= 1:
            raise ValueError("max_widening must be at least 1 (1: never widen)")
        self.max_widening = float(max_widening)
        self.tkwargs: dict[str, Any] = {"device": torch_device(), "dtype": torch.double}
        #: where the newest trained surrogate comes from (``latest() -> ModelVersion | None``),
        #: set by the orchestrator; ``None``: this planner fits its own GP (warm, see ``warm_start``)
        self.surrogate_source: Any = None

    accepts_surrogates = True

    # ---- the interface ---------------------------------------------------
    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]],
            state: dict[str, Any] | None = None) -> list[Proposal]:
        space = self.problem.space
        completed = self.completed(history)
        seed = self.step_seed(history, pending)
        if len(completed) < self.initial_trials:
            X = sobol_points(design_space(self.problem), n, self.seed, skip=len(history) + len(pending))
            return _proposals(self, X, history, pending, seed)

        # gpytorch's debug checks (shapes of the training data on every call) cost a fifth of the
        # GP fit at lab sizes; the inputs here are built by us and checked once, on encoding.
        # Exact Cholesky up to 20,000 points (GPyTorch would switch to approximate solves at 800,
        # and a trained GP version may hold up to the trainer's switch point).
        with manual_seed(seed), gpytorch.settings.debug(False), gpytorch.settings.max_cholesky_size(20_000), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", category=OptimizationWarning)
            warnings.simplefilter("ignore", category=InputDataWarning)
            warnings.simplefilter("ignore", category=BotorchWarning)
            warnings.simplefilter("ignore", category=RuntimeWarning)
            failed = [h for h in history if h.state == "failed"] if self.feasibility_model else []
            trained = self._trained_version(len(completed))
            setup = _ModelSetup(self, completed, failed, trained, state)
            X_pending = space.encode(pending).to(**self.tkwargs) if pending else None
            acqf = setup.acquisition(X_pending, seed, self.mc_samples)
            if self.problem.pool is not None:
                legal, rows = self._optimize_pool(acqf, n, history, pending)
            else:
                candidates = self._optimize(acqf, n)
                legal, rows = space.encode(space.decode(candidates)).to(**self.tkwargs), None
            mean, sd = setup.predict(legal)
            with torch.no_grad():
                values = [float(acqf(legal[i : i + 1].unsqueeze(0))) for i in range(len(legal))]
            ood = ood_score(setup.X, legal).tolist()
        if trained is None:
            version, unseen = f"gp-{len(completed)}", 0
        else:
            version, unseen = trained.label, max(0, len(completed) - trained.n_points)
        version += f"+{len(failed)}f" if failed else ""
        if setup.inflation > 1:
            version += f"x{setup.inflation:.2g}"
        params = ([dict(self.problem.pool[i]) for i in rows] if rows is not None  # type: ignore[index]
                  else space.decode(legal))
        return self.model_proposals(params, seed, mean.tolist(), sd.tolist(), values, version,
                                    unseen=unseen, ood=ood, state=setup.state)

    def _trained_version(self, results: int) -> Any:
        """The newest trained model version when one is available and fits this problem; a live
        source may wait (a bounded time) for the version trained on all ``results``, so that a
        campaign's decisions do not depend on how fast its trainer was."""
        if self.surrogate_source is None:
            return None
        version = self.surrogate_source.latest(results=results)
        if version is None or version.targets.m != len(self.problem.objectives) + len(self.problem.outcome_constraints):
            return None
        return version

    def _own_model(self, X: torch.Tensor, Y: torch.Tensor,
                   state: dict[str, Any] | None) -> tuple[SingleTaskGP, dict[str, Any]]:
        """This planner's GP on all of ``X, Y`` (utilities), refitted from the hyperparameters in
        ``state`` (the previous proposal's ``model_state``) when they fit, else from scratch;
        returns the model and the ``model_state`` to record with this ask's proposals."""
        gp = ExactGP(fit_maxiter=self.fit_maxiter, update_maxiter=self.update_maxiter,
                     device=self.tkwargs["device"])
        hyper = state.get("gp") if isinstance(state, dict) else None
        warm = False
        if hyper is not None:
            try:
                gp.fit_from(X, Y, hyper)
                warm = True
            except (ValueError, TypeError, RuntimeError):
                pass  # a state of another shape (the campaign file changed): fit from scratch
        if not warm:  # also the first model-based ask
            gp.fit(X, Y)
        return gp.model, {"gp": gp.hyperparameters()}

    # ---- acquisition optimisation -----------------------------------------
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
            # raw samples scored 64 at a time (BoTorch would score them 8 at a time, batch_limit)
            options={"batch_limit": 8, "init_batch_limit": 64, "maxiter": self.maxiter},
        )
        starts = {}
        if ineq or eq:
            starts["generator"] = _FeasibleStarts(bounds, common["inequality_constraints"],
                                                  common["equality_constraints"])
        combos = space.categorical_combinations
        if combos == [{}]:
            X, _ = optimize_acqf(**common, sequential=self.sequential and q > 1, **starts)
            return X
        if len(combos) > self.max_categorical_combinations:
            rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))
            combos = rng.sample(combos, self.max_categorical_combinations)
        X, _ = optimize_acqf_mixed(fixed_features_list=combos, **common, ic_gen_kwargs=starts)
        return X

    def _optimize_pool(self, acqf, q: int, history, pending) -> tuple[torch.Tensor, list[int]]:
        untried = self.untried_pool(history, pending)
        if len(untried) < q:
            raise ValueError(f"the pool has {len(untried)} untried rows, fewer than the {q} asked for")
        choices = self.problem.space.encode([self.problem.pool[i] for i in untried]).to(**self.tkwargs)  # type: ignore[index]
        X, _ = optimize_acqf_discrete(acqf, q=q, choices=choices, max_batch_size=2048, unique=True)
        index = {tuple(row.tolist()): untried[i] for i, row in enumerate(choices)}
        return X, [index[tuple(row.tolist())] for row in X]


class _FeasibleStarts:
    """Raw samples for the acquisition optimiser's starting points that satisfy the linear constraints.

    BoTorch draws them by hit-and-run with 10,000 burn-in steps and a thinning of 32, a Python
    loop that took 1.7 s of a 2.7 s proposal on Hartmann6 with one linear constraint. Inequality
    constraints alone: scrambled Sobol points with the infeasible ones dropped (space-filling, and
    microseconds), as long as at least 1 in 64 is feasible. Otherwise (equality constraints, or a
    thin feasible region): hit-and-run from BoTorch with 1,000 burn-in steps and a thinning of 8,
    plenty to mix in the few dimensions a lab varies. Called as ``generator(n, q, seed)`` by
    BoTorch's ``gen_batch_initial_conditions``; returns ``n x q x d`` points.
    """

    def __init__(self, bounds: torch.Tensor, inequality: list | None, equality: list | None) -> None:
        self.bounds = bounds
        self.inequality = inequality or []
        self.equality = equality or []

    def feasible(self, X: torch.Tensor) -> torch.Tensor:
        ok = torch.ones(X.shape[0], dtype=torch.bool, device=X.device)
        for idx, coef, rhs in self.inequality:
            ok &= (X[:, idx] * coef).sum(-1) >= rhs - 1e-9
        return ok

    def __call__(self, n: int, q: int, seed: int | None) -> torch.Tensor:
        d = self.bounds.shape[-1]
        if not self.equality:
            engine = SobolEngine(d, scramble=True, seed=seed)
            want, kept = n * q, []
            for _ in range(6):  # 2, 4, ... up to 64 draws per point needed
                draw = engine.draw(max(2 * want, 64), dtype=self.bounds.dtype).to(self.bounds.device)
                kept.append(draw[self.feasible(draw)])
                if sum(len(k) for k in kept) >= want:
                    return torch.cat(kept)[:want].view(n, q, d).cpu()
        return sample_q_batches_from_polytope(n=n, q=q, bounds=self.bounds, n_burnin=1000, n_thinning=8, seed=seed,
                                              inequality_constraints=self.inequality or None,
                                              equality_constraints=self.equality or None)


class _ModelSetup:
    """The models of one ``ask`` and how their outputs map to objectives and constraints.

    Outputs, in order: one per objective (warped utility, or raw for a target goal),
    one per constrained outcome (raw), then success probability if trials failed.
    """

    def __init__(self, planner: BayesianPlanner, completed: list[HistoryItem], failed: list[HistoryItem],
                 trained: Any = None, state: dict[str, Any] | None = None):
        self.p = planner
        problem, tk = planner.problem, planner.tkwargs
        self.objectives = problem.objectives
        self.constraints = problem.outcome_constraints
        space = problem.space
        self.X = space.encode([h.parameters for h in completed]).to(**tk)
        self.targets, Y = TargetMap.fit(problem, [h.outcomes for h in completed])
        Y = Y.to(**tk)
        fit = lambda m: _fit(m, planner.fit_maxiter)  # noqa: E731
        self.inflation = 1.0
        #: the proposals' ``model_state``: the own GP's hyperparameters, for the next ask
        self.state: dict[str, Any] | None = None
        if trained is None and planner.warm_start and planner.surrogate_source is None:
            main, self.state = planner._own_model(self.X, Y, state)
        elif trained is None:
            main = fit(SingleTaskGP(self.X, Y, outcome_transform=Standardize(m=Y.shape[-1])))
        elif trained.kind == "gp":  # the trainer's hyperparameters on all the data there is now
            main = trained.surrogate.with_data(self.X, Y)
        else:  # the deep ensemble as trained (on its version's data and scale)
            main, self.targets = trained.surrogate.model, trained.targets
        # BoTorch's cached root decomposition works only on a plain GPyTorch posterior
        self.ensemble = trained is not None and trained.kind != "gp"
        if trained is not None:
            # the recent results fell outside the model's intervals too often (inflation > 1): widen
            # them, so the acquisition values uncertainty more (explores more) until calibration recovers
            self.inflation = min(float(trained.inflation), planner.max_widening)
        self.cache_root = (trained is None or trained.kind == "gp") and self.inflation == 1
        if self.inflation > 1:
            main = inflate(main, self.inflation)
        self.n_main = Y.shape[-1]
        self.feasibility = None
        if failed:
            Xf = torch.cat([self.X, space.encode([h.parameters for h in failed]).to(**tk)])
            ok = torch.cat([torch.ones(len(completed), 1, **tk), torch.zeros(len(failed), 1, **tk)])
            self.feasibility = fit(SingleTaskGP(Xf, ok, outcome_transform=Standardize(m=1)))
            self.model = ModelListGP(main, self.feasibility)
        else:
            self.model = main

    def _utilities(self, Z: torch.Tensor) -> torch.Tensor:
        """``... x outputs`` model samples -> ``... x k`` utilities (larger is better)."""
        cols = []
        for i, o in enumerate(self.objectives):
            cols.append(-(Z[..., i] - o.target).abs() if o.goal == "target" else Z[..., i])
        return torch.stack(cols, dim=-1)

    def _constraint_callables(self) -> list:
        out = []
        k = len(self.objectives)
        for j, c in enumerate(self.constraints):
            out.append(lambda Z, i=k + j, c=c: c.slack(Z[..., i]))  # noqa: B008
        if self.feasibility is not None:
            out.append(lambda Z, i=self.n_main: 0.5 - Z[..., i])
        return out

    def acquisition(self, X_pending: torch.Tensor | None, seed: int, mc_samples: int):
        if self.ensemble:  # its posterior's samples are its members (and the feasibility GP's, if any)
            sampler = get_sampler(self.model.posterior(self.X[:1]), torch.Size([mc_samples]), seed=seed)
        else:
            sampler = SobolQMCNormalSampler(sample_shape=torch.Size([mc_samples]), seed=seed)
        constraints = self._constraint_callables() or None
        if len(self.objectives) == 1:
            return qLogNoisyExpectedImprovement(
                model=self.model, X_baseline=self.X, sampler=sampler,
                objective=GenericMCObjective(lambda Z, X=None: self._utilities(Z)[..., 0]),
                constraints=constraints, X_pending=X_pending, prune_baseline=True, cache_root=self.cache_root,
            )
        with torch.no_grad():
            U = self._utilities(self.model.posterior(self.X).mean)
        if self.p.reference_point is not None:
            ref = self._utility_of_reference(torch.tensor(self.p.reference_point, **self.p.tkwargs))
        else:
            ref = infer_reference_point(U)
        return qLogNoisyExpectedHypervolumeImprovement(
            model=self.model, ref_point=ref.tolist(), X_baseline=self.X, sampler=sampler,
            objective=GenericMCMultiOutputObjective(lambda Z, X=None: self._utilities(Z)),
            constraints=constraints, X_pending=X_pending, prune_baseline=True, cache_root=self.cache_root,
        )

    def _utility_of_reference(self, ref_raw: torch.Tensor) -> torch.Tensor:
        """A reference point given in measured units, in the model's (warped) utility space."""
        out = []
        for i, o in enumerate(self.objectives):
            warp = self.targets.columns[i].warp
            if warp is None:
                out.append(-(ref_raw[i] - o.target).abs())
            else:
                out.append(warp_with(o.utility(ref_raw[i]), *warp))
        return torch.stack(out)

    def predict(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted mean and standard deviation of every outcome in measured units (``q x m``,
        in the order of ``Problem.outcome_names``), from posterior samples mapped back through
        the warp."""
        with torch.no_grad():
            samples = self.model.posterior(X).rsample(torch.Size([256]))  # 256 x q x outputs
        measured = self.targets.to_measured(samples[..., : self.targets.m])
        S = torch.stack([measured[k] for k in self.p.problem.outcome_names], dim=-1)
        return S.mean(dim=0), S.std(dim=0)


def _fit(model: SingleTaskGP, maxiter: int) -> SingleTaskGP:
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model),
                     optimizer_kwargs={"options": {"maxiter": maxiter}})
    return model


__all__ = ["BayesianPlanner", "tail_warp", "tail_unwarp", "torch_device"]
