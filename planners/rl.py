"""Model-based reinforcement learning: a policy trained by policy gradient on GP sample functions.

The planner treats "choose the next experiments" as a short episodic decision
problem and solves it by reinforcement learning inside a learned model of the
world, in the spirit of model-based policy search (Deisenroth & Rasmussen,
"PILCO", ICML 2011) and of learned, non-myopic acquisition policies (Volpp et
al., "Meta-Learning Acquisition Functions for Transfer Learning in Bayesian
Optimization", ICLR 2020). At every ``ask``:

1. **Model.** A ``SingleTaskGP`` with ``Standardize`` is fitted to the completed
   trials, one output per outcome (objectives, then constrained outcomes), as in
   :class:`planners.bo.BayesianPlanner`. Until ``initial_trials`` trials have
   completed, the planner proposes the campaign's Sobol points instead.
2. **Simulated worlds.** Functions are drawn from the GP posterior by pathwise
   (Matheron) sampling (Wilson et al., "Efficiently Sampling Functions from
   Gaussian Process Posteriors", ICML 2020; BoTorch's ``draw_matheron_paths``).
   A draw is a whole function, cheap and differentiable anywhere, so one draw is
   one world in which an episode of several experiments can be played.
3. **Episodes.** An episode starts at the real incumbent (the best completed
   trial) and lasts ``horizon`` experiments. At each step the policy, a small
   MLP, maps the state (incumbent location, last point tried, improvement so
   far, the last point's shortfall from the best, fraction of the horizon used)
   to a diagonal Gaussian over ``u``; the point tried is ``u`` folded (reflected)
   into the unit cube, then made legal: integers rounded, one-hot categoricals
   snapped, linear constraints enforced by alternating projections, pool rows
   snapped to the nearest untried row. The return is the improvement of the
   episode's best over the best value of the data under the same function. With
   ``horizon: 1`` its mean is the noisy expected improvement; longer horizons
   value what a first experiment makes possible next (non-myopic, as in
   rollout-based BO: Lam, Willcox & Wolpert, "Bayesian Optimization with a
   Finite Budget: An Approximate Dynamic Programming Approach", NeurIPS 2016).
4. **Policy gradient.** The new policy's mean starts at the best of
   ``raw_samples`` random points under the training draws (as BoTorch starts
   its acquisition optimiser from raw samples), then ``train_steps`` Adam
   updates on ``episodes`` draws follow. The default ``estimator: pathwise`` is
   the reparameterised policy gradient, back-propagated through the
   differentiable sample functions and the episode (SVG(inf): Heess et al.,
   "Learning Continuous Control Policies by Stochastic Value Gradients",
   NeurIPS 2015; the analytic model gradient of PILCO); legalisation passes
   gradients straight through. It ascends the log of the mean return with the
   improvement smoothed by a fat-tailed softplus, the device of LogEI (Ament et
   al., "Unexpected Improvements to Expected Improvement for Bayesian
   Optimization", NeurIPS 2023): the plain mean improvement is exactly zero on
   every draw over most of a 6-d space once the model is confident, which left
   the policy without a signal (and its proposals random) in our Hartmann6 runs.
   ``estimator: reinforce`` is the score-function estimator (Williams, 1992)
   with reward-to-go and a batch-mean baseline per step; it was competitive on
   2-d Branin and clearly worse on 6-d Hartmann, where its variance grows with
   the dimension.
5. **Proposal.** The policy's mean first action and ``candidates - 1`` sampled
   first actions are scored on ``eval_functions`` fresh draws: each candidate is
   played as the first step and the trained policy plays the rest of the
   episode, with common random numbers across candidates. The best smoothed
   mean return wins; it is the proposal's ``acquisition_value`` (expected
   improvement of the episode, in units of the objective's utility). Scoring on
   fresh draws keeps the policy's over-fitting to its training draws out of the
   choice.

The default horizon is 1, chosen on evidence: in our Branin (20 trials) and
Hartmann6 (35 trials) campaigns, horizon 2 did worse than 1 (median best over
5 seeds: Branin 0.99 vs 0.69, Hartmann6 -2.16 vs -2.67; horizon 3, tried with
earlier versions of this planner, was no better). With
horizon 1 the state never changes within an episode, so the policy is in
effect a learned Gaussian search distribution over the next point, trained by
a policy gradient on the model's sample functions; the multi-step machinery
(state, rollouts, reward-to-go) is there for ``horizon > 1``.

Running and batched trials: pending points (and, for ``n > 1``, the points
already chosen in this call) are added to the GP as fantasy observations at
its posterior mean ("kriging believer", Ginsbourger, Le Riche & Carraro, 2010)
without refitting hyper-parameters, and join the data whose best defines the
improvement; their variance shrinks, so the policy is steered away from them.
Each further batch member fine-tunes the same policy for ``fine_tune_steps``.

Several objectives are scalarised by an augmented Chebyshev function of the
utilities, normalised to their observed range, with weights drawn at random
per ``ask`` from the step seed (ParEGO: Knowles, IEEE TEVC 2006). Outcome
constraints are checked per sample function: a point counts only where the
sampled outcomes meet every constraint (constrained improvement). Failed
trials are ignored, as in ``bo``. Linear constraints hold exactly for the
proposal: alternating projections to 1e-12, then, should that fail, the
nearest of 512 feasible draws (:func:`planners.baselines.sample_feasible`).

Reproducibility: everything random runs under BoTorch's ``manual_seed`` of
the step seed, so the same seed, history and pending points give the same
proposals. ``warm_start: true`` starts each ask's policy from the previous
ask's (same dimension), which travels as the proposal's ``model_state`` (the
policy's weights as plain lists, a few thousand numbers) and comes back as
``ask(..., state=...)``, so a resumed campaign reproduces it too; off by
default (it makes each proposal's ledger row some 100 kB larger).

The GP, the draws, the episodes and the policy run on ``cuda`` when present
(:func:`planners.bo.torch_device`). On the CPU an ask runs on ``cpu_threads``
torch threads (default 1): the episodes are thousands of small tensor
operations, and on a shared 2-core machine two threads made an ask about ten
times slower than one.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.sampling.pathwise import draw_kernel_feature_paths, draw_matheron_paths
from botorch.utils.safe_math import log_fatplus, logmeanexp
from botorch.utils.sampling import manual_seed
from gpytorch.mlls import ExactMarginalLogLikelihood
from torch import nn

from planners.base import HistoryItem, Planner, Problem, Proposal
from planners.baselines import design_space, sample_feasible, sobol_points
from planners.bo import torch_device
from planners.space import CategoricalParameter, IntParameter

_MIN_LOG_SD, _MAX_LOG_SD = math.log(1e-3), math.log(1.0)


@contextmanager
def _cpu_threads(threads: int, device: torch.device):
    """Run with ``threads`` torch threads on the CPU, then restore the previous setting."""
    before = torch.get_num_threads()
    if device.type != "cpu" or threads <= 0 or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fold(u: torch.Tensor) -> torch.Tensor:
    """Reflect the real line into ``[0, 1]`` (a triangle wave): ``1.2 -> 0.8``, ``-0.1 -> 0.1``.

    The policy acts in ``R^d`` and the world folds its action into the unit cube.
    Unlike clipping or a sigmoid, folding never flattens (its slope is +-1), so a
    policy's mean cannot drift past a bound and stall there.
    """
    r = torch.remainder(u, 2.0)
    return 1.0 - (1.0 - r).abs()


class _Policy(nn.Module):
    """State -> a diagonal Gaussian over ``u``; the point tried is ``_fold(u)``."""

    def __init__(self, d: int, hidden: int, init_sd: float) -> None:
        super().__init__()
        self.d = d
        self.body = nn.Sequential(
            nn.Linear(2 * d + 3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.head = nn.Linear(hidden, d)
        with torch.no_grad():  # start near the centre of the cube, whatever the state
            self.head.weight.mul_(0.01)
            self.head.bias.fill_(0.5)
        self.log_sd = nn.Parameter(torch.full((d,), math.log(init_sd)))

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.head(self.body(state))
        sd = self.log_sd.clamp(_MIN_LOG_SD, _MAX_LOG_SD).exp().expand_as(mu)
        return mu, sd


@dataclass
class _Ask:
    """What one ``ask`` works with (kept off the planner, so concurrent asks cannot mix)."""

    z_inc: torch.Tensor  # the incumbent, encoded
    scale: float  # spread of the observed values: the unit of the policy's inputs and loss
    weights: torch.Tensor | None = None  # Chebyshev weights (several objectives)
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    floor: float = -math.inf  # the value of an infeasible point (outcome constraints)
    pool: torch.Tensor | None = None  # untried pool rows, encoded (pool mode)


class RLPlanner(Planner):
    """A policy trained by policy gradient on episodes simulated from GP posterior samples.

    Options (``planner.options`` in a campaign file):
      - ``initial_trials`` (int, default 5): Sobol points before the first model.
      - ``horizon`` (1): experiments per simulated episode (1: myopic; see the module notes).
      - ``estimator`` (``pathwise``): ``pathwise`` (reparameterised) or ``reinforce``.
      - ``episodes`` (128): posterior sample functions (episodes) per training step.
      - ``train_steps`` (100): policy-gradient updates per ask.
      - ``fine_tune_steps`` (30): further updates for each extra member of a batch.
      - ``eval_functions`` (128): fresh sample functions that score the candidates.
      - ``candidates`` (64): first actions scored (the policy's mean and samples).
      - ``hidden`` (64): width of the policy's two hidden layers.
      - ``learning_rate`` (0.01): Adam's step size.
      - ``init_sd`` (0.3): the policy's initial standard deviation in the unit cube.
      - ``num_features`` (512): random Fourier features of each prior sample path.
      - ``raw_samples`` (512): random points among which the new policy's initial mean
        is the one with the largest mean improvement on the training draws (0: the centre).
      - ``warm_start`` (false): start from the previous ask's policy (see the module notes).
      - ``cpu_threads`` (1): torch threads during an ask on the CPU (0: leave torch's
        setting alone); process-wide while the ask runs, restored afterwards.
    """

    name = "rl"
    _TAU = 1e-6  # smoothing of the improvement, relative to the spread of observed values

    def __init__(
        self,
        problem: Problem,
        seed: int = 0,
        initial_trials: int = 5,
        horizon: int = 1,
        estimator: str = "pathwise",
        episodes: int = 128,
        train_steps: int = 100,
        fine_tune_steps: int = 30,
        eval_functions: int = 128,
        candidates: int = 64,
        hidden: int = 64,
        learning_rate: float = 0.01,
        init_sd: float = 0.3,
        num_features: int = 512,
        raw_samples: int = 512,
        warm_start: bool = False,
        cpu_threads: int = 1,
    ) -> None:
        super().__init__(problem, seed)
        least = {
            "initial_trials": (initial_trials, 1), "horizon": (horizon, 1),
            "episodes": (episodes, 2), "train_steps": (train_steps, 0),
            "fine_tune_steps": (fine_tune_steps, 0), "eval_functions": (eval_functions, 1),
            "candidates": (candidates, 1), "hidden": (hidden, 1),
            "num_features": (num_features, 2), "cpu_threads": (cpu_threads, 0),
            "raw_samples": (raw_samples, 0),
        }
        for key, (value, bound) in least.items():
            if int(value) < bound:
                raise ValueError(f"{key} must be at least {bound} (got {value})")
        if estimator not in ("pathwise", "reinforce"):
            raise ValueError(f"estimator must be 'pathwise' or 'reinforce' (got {estimator!r})")
        if not 0.001 <= init_sd <= 1.0:
            raise ValueError(f"init_sd must be in [0.001, 1] (got {init_sd})")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive (got {learning_rate})")
        self.initial_trials = int(initial_trials)
        self.horizon = int(horizon)
        self.estimator = estimator
        self.episodes = int(episodes)
        self.train_steps = int(train_steps)
        self.fine_tune_steps = int(fine_tune_steps)
        self.eval_functions = int(eval_functions)
        self.candidates = int(candidates)
        self.hidden = int(hidden)
        self.learning_rate = float(learning_rate)
        self.init_sd = float(init_sd)
        self.num_features = int(num_features)
        self.raw_samples = int(raw_samples)
        self.warm_start = bool(warm_start)
        self.cpu_threads = int(cpu_threads)
        self.tkwargs: dict[str, Any] = {"device": torch_device(), "dtype": torch.double}

    # ---- the interface ---------------------------------------------------
    def ask(self, n: int, history: list[HistoryItem], pending: list[dict[str, Any]],
            state: dict[str, Any] | None = None) -> list[Proposal]:
        if n < 1:
            return []
        space = self.problem.space
        names = self.problem.outcome_names
        completed = self.completed(history)
        seed = self.step_seed(history, pending)
        rows = self._untried_rows(history, pending)
        if rows is not None:
            n = min(n, len(rows))  # a pool can run out
            if n == 0:
                return []
        if len(completed) < self.initial_trials:
            X = sobol_points(design_space(self.problem), n, self.seed, skip=len(history) + len(pending))
            params = space.decode(X) if rows is None else _snap_to_rows(space, X, rows)
            return [Proposal(parameters=p, planner=self.name, seed=seed) for p in params]

        with manual_seed(seed), _cpu_threads(self.cpu_threads, self.tkwargs["device"]):
            X = space.encode([h.parameters for h in completed]).to(**self.tkwargs)
            Y = torch.tensor([[float(h.outcomes[k]) for k in names] for h in completed], **self.tkwargs)
            model = SingleTaskGP(X, Y, outcome_transform=Standardize(m=Y.shape[-1]))
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
            model.eval()
            model.requires_grad_(False)
            ctx = self._context(X, Y, rows)

            X_fant = space.encode(pending).to(**self.tkwargs) if pending else X[:0]
            policy, warm = self._new_policy(space.dim, state)
            chosen: list[torch.Tensor] = []
            scores: list[float] = []
            for i in range(n):
                world = model
                if len(X_fant):
                    with torch.no_grad():
                        world = model.condition_on_observations(X_fant, model.posterior(X_fant).mean)
                    world.eval()
                base = torch.cat([X, X_fant])
                steps = self.train_steps if i == 0 else self.fine_tune_steps
                self._train(ctx, policy, world, base, steps, fresh=i == 0 and not warm)
                z, score = self._choose(ctx, policy, world, base, chosen)
                chosen.append(z)
                scores.append(score)
                X_fant = torch.cat([X_fant, z.unsqueeze(0)])
                if ctx.pool is not None:  # a row once chosen is no longer untried
                    ctx.pool = ctx.pool[(ctx.pool - z).abs().sum(-1) > 1e-9]
            new_state = None
            if self.warm_start:
                new_state = {"dim": space.dim,
                             "policy": {k: v.detach().cpu().tolist() for k, v in policy.state_dict().items()}}
            Z = torch.stack(chosen)
            with torch.no_grad():
                post = model.posterior(Z)
                mean, var = post.mean, post.variance

        params = space.decode(Z) if rows is None else _snap_to_rows(space, Z.cpu(), rows)
        sd = var.clamp_min(0).sqrt()
        return self.model_proposals(params, seed, mean.tolist(), sd.tolist(), scores, f"rl-gp-{len(completed)}",
                                    state=new_state)

    # ---- what a point is worth ---------------------------------------------
    def _context(self, X: torch.Tensor, Y: torch.Tensor, rows: list[dict[str, Any]] | None) -> _Ask:
        """Per-ask constants: Chebyshev weights and ranges, infeasible floor, pool, incumbent."""
        ctx = _Ask(z_inc=X[0], scale=1.0)
        k = len(self.problem.objectives)
        if k > 1:
            w = -torch.rand(k, **self.tkwargs).clamp_min(1e-12).log()  # uniform on the simplex
            U = self._utilities(Y)
            ctx.weights, ctx.lo, ctx.hi = w / w.sum(), U.min(0).values, U.max(0).values
        if self.problem.outcome_constraints:
            raw = self._scalarise(ctx, Y)
            ctx.floor = float(raw.min()) - (float(raw.max() - raw.min()) or 1.0)
        if rows is not None:
            ctx.pool = self.problem.space.encode(rows).to(**self.tkwargs)
        values = self._value(ctx, Y)
        spread = float(values.std()) if len(values) > 1 else 0.0
        ctx.scale = spread if math.isfinite(spread) and spread > 0 else 1.0
        ctx.z_inc = X[int(values.argmax())]
        return ctx

    def _utilities(self, Y: torch.Tensor) -> torch.Tensor:
        return torch.stack([o.utility(Y[..., i]) for i, o in enumerate(self.problem.objectives)], dim=-1)

    def _scalarise(self, ctx: _Ask, Y: torch.Tensor) -> torch.Tensor:
        U = self._utilities(Y)
        if ctx.weights is None:
            return U[..., 0]
        wz = ctx.weights * (U - ctx.lo) / (ctx.hi - ctx.lo).clamp_min(1e-12)
        return wz.min(-1).values + 0.05 * wz.sum(-1)

    def _value(self, ctx: _Ask, Y: torch.Tensor) -> torch.Tensor:
        """``... x m`` outcomes -> ``...`` values, larger is better; infeasible -> the floor."""
        v = self._scalarise(ctx, Y)
        if self.problem.outcome_constraints:
            names = self.problem.outcome_names
            ok = torch.ones_like(v, dtype=torch.bool)
            for c in self.problem.outcome_constraints:
                ok &= c.slack(Y[..., names.index(c.name)]) <= 0
            v = torch.where(ok, v, torch.full_like(v, ctx.floor))
        return v

    # ---- the simulated world ---------------------------------------------------
    def _draw(self, model: SingleTaskGP, count: int):
        """``count`` posterior sample functions: ``S x k x d`` points -> ``S x k x m`` outcomes."""
        sampler = partial(draw_kernel_feature_paths, num_features=self.num_features)
        with torch.no_grad():  # the draws are fixed worlds: gradients flow through x only
            paths = draw_matheron_paths(model, torch.Size([count]), prior_sampler=sampler)
        m = len(self.problem.outcome_names)

        def outcomes(x: torch.Tensor) -> torch.Tensor:
            if m == 1:
                return paths(x).unsqueeze(-1)
            return paths(x.unsqueeze(-3)).transpose(-1, -2)

        return outcomes

    def _legalize(self, ctx: _Ask, a: torch.Tensor) -> torch.Tensor:
        """Points in the unit cube -> encoded legal points of the search space."""
        space = self.problem.space
        z = a.clamp(0.0, 1.0)
        if ctx.pool is not None:
            idx = torch.cdist(z.reshape(-1, z.shape[-1]), ctx.pool).argmin(-1)
            return ctx.pool[idx].reshape(z.shape)
        if space.constraints:
            z = self._project(z)
        z = z.clone()
        for p, sl in space.columns():
            if isinstance(p, IntParameter):
                width = p.upper - p.lower + 1
                k = torch.floor(z[..., sl.start] * width).clamp(0, width - 1)
                z[..., sl.start] = (k + 0.5) / width
            elif isinstance(p, CategoricalParameter):
                hot = torch.nn.functional.one_hot(z[..., sl].argmax(-1), sl.stop - sl.start)
                z[..., sl] = hot.to(z.dtype)
        return z

    def _project(self, z: torch.Tensor, iterations: int = 30, tol: float = 0.0) -> torch.Tensor:
        """Alternating projections onto the linear constraints and the cube: a feasible point
        near ``z`` (not the nearest, which the episodes do not need)."""
        ineq, eq = self.problem.space.linear_constraints_encoded()
        rows = [(i.to(z.device), c.to(z), r, False) for i, c, r in ineq]
        rows += [(i.to(z.device), c.to(z), r, True) for i, c, r in eq]
        for _ in range(iterations):
            worst = 0.0
            for idx, coef, rhs, equal in rows:
                gap = rhs - (z[..., idx] * coef).sum(-1)  # > 0: below the bound
                if not equal:
                    gap = gap.clamp_min(0.0)
                worst = max(worst, float(gap.detach().abs().max()))
                z = z.index_add(-1, idx, gap.unsqueeze(-1) * coef / coef.dot(coef))
            z = z.clamp(0.0, 1.0)
            if worst <= tol:
                break
        return z

    def _state(self, inc, last, gain, shortfall, t: int) -> torch.Tensor:
        frac = torch.full_like(gain, t / self.horizon)
        return torch.cat([inc, last, gain.unsqueeze(-1), shortfall.unsqueeze(-1), frac.unsqueeze(-1)], -1)

    def _rollout(self, ctx: _Ask, policy, outcomes, best0, k: int = 1, first=None,
                 common: bool = False, pathwise: bool = False):
        """Play ``horizon`` steps on each of the ``S`` sample functions, ``k`` episodes each.

        Returns the log-probabilities of the policy's actions (``S x k x H``; a forced
        ``first`` action has 0) and the running best value (``S x k x H``). With
        ``pathwise`` the running best is differentiable in the policy's parameters:
        actions are reparameterised, the sample functions are differentiable, and
        legalisation (rounding, snapping, projection) passes gradients straight through.
        """
        S, d = best0.shape[0], ctx.z_inc.shape[-1]
        inc = ctx.z_inc.expand(S, k, d)
        last = inc
        best = best0.unsqueeze(-1).expand(S, k)
        shortfall = torch.zeros_like(best)
        logps, bests = [], []
        for t in range(self.horizon):
            state = self._state(inc, last, (best - best0.unsqueeze(-1)) / ctx.scale, shortfall, t)
            mu, sd = policy(state)
            if t == 0 and first is not None:
                a = first.expand(S, k, d)
                logp = torch.zeros(S, k, **self.tkwargs)
            else:
                eps = torch.randn(S, 1 if common else k, d, **self.tkwargs)
                u = mu + sd * eps
                if not pathwise:
                    u = u.detach()
                a = _fold(u)
                # REINFORCE scores u, the policy's own action; the fold belongs to the world
                logp = torch.distributions.Normal(mu, sd).log_prob(u.detach()).sum(-1)
            x = self._legalize(ctx, a.detach())
            if pathwise:
                x = a + (x - a.detach())  # straight-through: x's value, a's gradient
                v = self._value(ctx, outcomes(x))
            else:
                with torch.no_grad():
                    v = self._value(ctx, outcomes(x))
            better = v > best
            inc = torch.where(better.unsqueeze(-1), x, inc)
            best = torch.maximum(best, v)
            shortfall = (v - best) / ctx.scale
            last = x
            logps.append(logp)
            bests.append(best)
        return torch.stack(logps, -1), torch.stack(bests, -1)

    def _baseline_best(self, ctx: _Ask, outcomes, base: torch.Tensor, count: int) -> torch.Tensor:
        """Per sample function, the best value of the data (and fantasies) it passes through."""
        with torch.no_grad():
            return self._value(ctx, outcomes(base.expand(count, *base.shape))).max(-1).values

    def _log_gain(self, ctx: _Ask, gain: torch.Tensor) -> torch.Tensor:
        """``log mean_S fatplus(gain)`` over the sample functions (dim 0): a smooth, never-flat
        version of the log of the mean improvement (the LogEI device of Ament et al., 2023)."""
        return logmeanexp(log_fatplus(gain, tau=self._TAU * ctx.scale), dim=0)

    # ---- learning and choosing ---------------------------------------------------
    def _new_policy(self, d: int, state: dict[str, Any] | None) -> tuple[_Policy, bool]:
        """A policy, and whether it was warm-started from the previous ask's (``state``, the
        previous proposal's ``model_state``; one of another shape is ignored)."""
        policy = _Policy(d, self.hidden, self.init_sd).to(**self.tkwargs)
        if self.warm_start and isinstance(state, dict) and state.get("dim") == d:
            try:
                policy.load_state_dict({k: torch.as_tensor(v, **self.tkwargs)
                                        for k, v in state["policy"].items()})
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
                return _Policy(d, self.hidden, self.init_sd).to(**self.tkwargs), False
            with torch.no_grad():  # explore afresh: the model has moved on
                policy.log_sd.fill_(math.log(self.init_sd))
            return policy, True
        return policy, False

    def _train(self, ctx: _Ask, policy: _Policy, model, base: torch.Tensor, steps: int,
               fresh: bool) -> None:
        if steps == 0:
            return
        outcomes = self._draw(model, self.episodes)
        best0 = self._baseline_best(ctx, outcomes, base, self.episodes)
        if fresh and self.raw_samples:  # aim the new policy at the best of random points
            with torch.no_grad():
                raw = self._legalize(ctx, torch.rand(self.raw_samples, ctx.z_inc.shape[-1], **self.tkwargs))
                v = self._value(ctx, outcomes(raw.expand(self.episodes, *raw.shape)))
                gain = self._log_gain(ctx, v - best0.unsqueeze(-1))
                policy.head.bias.copy_(raw[int(gain.argmax())])
        opt = torch.optim.Adam(policy.parameters(), lr=self.learning_rate)
        pathwise = self.estimator == "pathwise"
        for _ in range(steps):
            logp, best = self._rollout(ctx, policy, outcomes, best0, pathwise=pathwise)
            if pathwise:  # the stochastic value gradient of the (log, smoothed) mean return
                loss = -self._log_gain(ctx, best[..., -1] - best0.unsqueeze(-1)).mean()
            else:  # REINFORCE: reward-to-go, a batch-mean baseline per step, normalised
                before = torch.cat([best0.view(-1, 1, 1), best[..., :-1]], -1)
                to_go = best[..., -1:] - before  # improvement from step t to the end
                adv = to_go - to_go.mean(0, keepdim=True)
                adv = adv / (adv.std() + 1e-12)
                loss = -(adv.detach() * logp).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def _choose(self, ctx: _Ask, policy: _Policy, model, base: torch.Tensor,
                chosen: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Score the policy's candidate first actions on fresh draws; return the best, legal."""
        d = ctx.z_inc.shape[-1]
        zero = torch.zeros(1, **self.tkwargs)
        with torch.no_grad():
            mu, sd = policy(self._state(ctx.z_inc.view(1, d), ctx.z_inc.view(1, d), zero, zero, 0))
            eps = torch.randn(self.candidates - 1, d, **self.tkwargs)
            cand = self._legalize(ctx, _fold(torch.cat([mu, mu + sd * eps])))
            if chosen:  # not a point of this batch again (discrete spaces)
                fresh = torch.cdist(cand, torch.stack(chosen)).min(-1).values > 1e-9
                if bool(fresh.any()):
                    cand = cand[fresh]
            outcomes = self._draw(model, self.eval_functions)
            best0 = self._baseline_best(ctx, outcomes, base, self.eval_functions)
            _, best = self._rollout(ctx, policy, outcomes, best0, k=len(cand), first=cand, common=True)
            q = self._log_gain(ctx, best[..., -1] - best0.unsqueeze(-1))
            i = int(q.argmax())
        return self._finalise(ctx, cand[i]), float(q[i].exp())

    def _finalise(self, ctx: _Ask, z: torch.Tensor) -> torch.Tensor:
        """An exactly legal encoded point (decode/encode round trip, constraints checked)."""
        space = self.problem.space
        if ctx.pool is not None:
            return z
        if space.constraints:
            z = self._legalize(ctx, self._project(z.unsqueeze(0), iterations=2000, tol=1e-12))[0]
            if not space.is_feasible(space.decode(z.unsqueeze(0))[0], tol=1e-7):
                F = sample_feasible(space, 512, self.seed).to(**self.tkwargs)
                z = F[int(torch.cdist(z.unsqueeze(0), F).argmin())]
        return space.encode(space.decode(z.unsqueeze(0))).to(**self.tkwargs)[0]

    # ---- pool mode ---------------------------------------------------------------
    def _untried_rows(self, history, pending) -> list[dict[str, Any]] | None:
        if getattr(self.problem, "pool", None) is None:
            return None
        return [dict(self.problem.pool[i]) for i in self.untried_pool(history, pending)]


def _snap_to_rows(space, Z: torch.Tensor, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each encoded point -> the nearest row not yet taken by an earlier point (distinct rows)."""
    R = space.encode(rows)
    free = torch.ones(len(rows), dtype=torch.bool)
    out = []
    for z in Z.double():
        dist = torch.cdist(z.view(1, -1), R)[0]
        dist[~free] = math.inf
        j = int(dist.argmin())
        free[j] = False
        out.append(dict(rows[j]))
    return out
