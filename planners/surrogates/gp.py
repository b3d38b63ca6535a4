"""Exact Gaussian-process surrogate: BoTorch's SingleTaskGP, fitted once and then warm-started as results arrive.

The model is BoTorch's ``SingleTaskGP`` (its default RBF ARD kernel with
dimension-scaled lengthscale priors, homoskedastic Gaussian noise) with a ``Standardize``
outcome transform; hyperparameters are MAP estimates found with L-BFGS-B on
the exact marginal log likelihood (Rasmussen and Williams, "Gaussian
Processes for Machine Learning", MIT Press 2006, ch. 5).

Two choices keep it fast enough to retrain after every result:
  - Inference always uses the Cholesky factor (``max_cholesky_size``), never
    GPyTorch's iterative CG/Lanczos path, which it would otherwise switch to
    above 800 points: exact, deterministic and faster on CPUs at these sizes.
  - The log likelihood's gradient is taken in closed form,
    ``d log N(y; 0, K) / dK = (a a^T - K^-1) / 2`` with ``a = K^-1 y``, from one
    Cholesky factor and one Cholesky solve, rather than by back-propagating
    through the Cholesky decomposition (about five times faster at 1,000
    points on a CPU, and the same numbers).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import gpytorch
import torch
from botorch.exceptions.errors import ModelFittingError
from botorch.exceptions.warnings import InputDataWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.optim.fit import fit_gpytorch_mll_scipy
from gpytorch.mlls import ExactMarginalLogLikelihood
from linear_operator.utils.errors import NotPSDError

from planners.surrogates.base import check_points, check_training_data, resolve_device

_FORMAT = "labpilot.surrogates.ExactGP/1"
_TRANSFORM_PREFIX = "outcome_transform."


def _cholesky(K: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of ``batch x n x n`` ``K``, adding a little jitter if it is not quite PD."""
    L, info = torch.linalg.cholesky_ex(K)
    if not bool(info.any()):
        return L
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    scale = K.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True).unsqueeze(-1)
    for jitter in (1e-8, 1e-7, 1e-6, 1e-5):
        L, info = torch.linalg.cholesky_ex(K + jitter * scale * eye)
        if not bool(info.any()):
            return L
    raise NotPSDError("the GP's training covariance is not positive definite even with jitter 1e-5")


class _GaussianLogProb(torch.autograd.Function):
    """``log N(r; 0, K)`` for ``K: batch x n x n``, ``r: batch x n`` -> ``batch``, with a closed-form backward.

    Backward: ``dK = (a a^T - K^-1) / 2``, ``dr = -a`` with ``a = K^-1 r``
    (Rasmussen and Williams 2006, eq. 5.9), from the forward's Cholesky factor.
    """

    @staticmethod
    def forward(ctx: Any, K: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        L = _cholesky(K)
        alpha = torch.cholesky_solve(r.unsqueeze(-1), L)
        logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        quad = (r.unsqueeze(-1) * alpha).sum((-2, -1))
        ctx.save_for_backward(L, alpha)
        return -0.5 * (quad + logdet + r.shape[-1] * math.log(2 * math.pi))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        L, alpha = ctx.saved_tensors
        grad_K = grad_r = None
        if ctx.needs_input_grad[0]:
            eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand(L.shape)
            K_inv = torch.cholesky_solve(eye, L)
            grad_K = 0.5 * grad[..., None, None] * (alpha @ alpha.transpose(-1, -2) - K_inv)
        if ctx.needs_input_grad[1]:
            grad_r = -grad[..., None] * alpha.squeeze(-1)
        return grad_K, grad_r


class CholeskyExactMLL(ExactMarginalLogLikelihood):
    """GPyTorch's exact marginal log likelihood (with the log priors, per point), computed densely.

    Same value as :class:`gpytorch.mlls.ExactMarginalLogLikelihood` in its
    Cholesky mode; the gradient comes from :class:`_GaussianLogProb`. Output:
    the model's batch shape (one value per outcome of a multi-output GP).
    """

    def forward(self, function_dist: Any, target: torch.Tensor, *params: Any, **kwargs: Any) -> torch.Tensor:
        output = self.likelihood(function_dist, *params, **kwargs)
        K = output.lazy_covariance_matrix.to_dense()
        res = _GaussianLogProb.apply(K, target - output.mean)
        res = self._add_other_terms(res, params)
        return res.div_(function_dist.event_shape.numel())


class FixedStandardize(Standardize):
    """``Standardize`` with a given mean and scale that stay fixed (m outcomes: buffers ``1 x m``).

    BoTorch's ``SingleTaskGP`` puts its outcome transform in train mode and so
    refits it on construction; this one stays in eval mode, so a model built on
    new data keeps the old standardisation (and its hyperparameters their meaning).
    """

    def train(self, mode: bool = True) -> Self:
        return super().train(False)


class ExactGP:
    """An exact GP on ``m`` outcomes over the unit cube (BoTorch ``SingleTaskGP`` + ``Standardize``).

    Args:
        fit_maxiter: L-BFGS-B iterations for :meth:`fit` (from BoTorch's initial values).
        update_maxiter: L-BFGS-B iterations for a warm-started :meth:`update`.
        update_ftol: relative change of the objective below which an update's
            L-BFGS-B stops early; from a warm start it usually stops after a
            couple of iterations.
        fit_timeout_s: optional wall-time cap on one hyperparameter fit (single
            outcome only: BoTorch fits several outcomes in one batch without one).
        restart_every: every this many warm refits, also fit from BoTorch's initial values and
            keep whichever reaches the higher marginal likelihood (0: never). A warm chain can
            stay in a poor optimum of the likelihood for good: in a 200-trial campaign on
            noisy Hartmann6 the warm-only chain drifted into one whose predictions missed by
            five standard deviations. Off by default: over 10 such campaigns restarts every
            10 refits lowered the median 95 % coverage (0.910 to 0.877), the likelihood's best
            hyperparameters being more confident than the warm chain's.
        device: ``cuda``/``cpu``; ``None`` picks ``cuda`` when there is one.
        max_cholesky_size: train sizes up to this use the exact Cholesky path.

    Tensors are double precision on ``device``; ``predict`` answers on the device its input came on.
    """

    def __init__(self, *, fit_maxiter: int = 50, update_maxiter: int = 10, update_ftol: float = 1e-6,
                 fit_timeout_s: float | None = None, device: str | torch.device | None = None,
                 max_cholesky_size: int = 20_000, restart_every: int = 0) -> None:
        if int(fit_maxiter) < 1:
            raise ValueError(f"fit_maxiter: must be at least 1, got {fit_maxiter}")
        if int(update_maxiter) < 0:
            raise ValueError(f"update_maxiter: must be 0 (no refit) or more, got {update_maxiter}")
        if not update_ftol > 0:
            raise ValueError(f"update_ftol: must be positive, got {update_ftol}")
        if fit_timeout_s is not None and not fit_timeout_s > 0:
            raise ValueError(f"fit_timeout_s: must be positive or None, got {fit_timeout_s}")
        self.fit_maxiter = int(fit_maxiter)
        self.update_maxiter = int(update_maxiter)
        self.update_ftol = float(update_ftol)
        self.fit_timeout_s = fit_timeout_s
        if int(restart_every) < 0:
            raise ValueError(f"restart_every: must be 0 (never) or more, got {restart_every}")
        self.restart_every = int(restart_every)
        self._refits = 0
        self.max_cholesky_size = int(max_cholesky_size)
        self.device = resolve_device(device)
        self._model: SingleTaskGP | None = None
        self._X = self._Y = torch.empty(0)

    # ----------------------------------------------------------------- public API

    @property
    def model(self) -> SingleTaskGP:
        """The fitted BoTorch model (eval mode) to hand to acquisition functions.

        Each ``fit``/``update`` makes a new one, so a model handed out earlier
        stays as it was. Above 800 training points, evaluate acquisition
        functions inside ``gpytorch.settings.max_cholesky_size(n)`` to keep
        GPyTorch on the exact Cholesky path.
        """
        if self._model is None:
            raise RuntimeError("ExactGP.model: the surrogate has not been fitted; call fit(X, Y) first")
        return self._model

    @property
    def train_X(self) -> torch.Tensor:
        """``n x d`` training points."""
        self.model  # noqa: B018 (raises when not fitted)
        return self._X

    @property
    def train_Y(self) -> torch.Tensor:
        """``n x m`` training outcomes in measured units."""
        self.model  # noqa: B018 (raises when not fitted)
        return self._Y

    def fit(self, X: torch.Tensor, Y: torch.Tensor) -> dict[str, Any]:
        """Fit from scratch on ``X: n x d`` (unit cube) and ``Y: n x m`` (raw outcomes).

        Returns fit metrics: ``n``; ``seconds``; ``iterations`` (L-BFGS-B);
        ``mll``: the fitted objective (exact marginal log likelihood plus the
        hyperparameters' log prior) per point, in standardised units, averaged
        over outcomes.
        """
        X, Y = check_training_data(X, Y)
        t0 = time.perf_counter()
        model = self._build(X, Y)
        iterations = self._optimise(model, self.fit_maxiter, max_attempts=5, options={})
        return self._finish(model, X, Y, t0, iterations=iterations, refit=True)

    def update(self, X: torch.Tensor, Y: torch.Tensor, *, refit: bool = True) -> dict[str, Any]:
        """Retrain on ALL the data so far (``X: n x d``, ``Y: n x m``; old points, then new), warm-started.

        ``refit=True``: refresh the standardisation and run at most
        ``update_maxiter`` L-BFGS-B iterations starting from the current
        hyperparameters (if that refit fails, the current hyperparameters are
        kept and ``refit_failed`` is set). ``refit=False``: condition on the
        data with the current hyperparameters and standardisation, no
        optimisation. With no model yet, this is :meth:`fit`. Returns the
        metrics of :meth:`fit`.
        """
        if self._model is None:
            return self.fit(X, Y)
        X, Y = check_training_data(X, Y, d=self._X.shape[-1], m=self._Y.shape[-1])
        t0 = time.perf_counter()
        state = self._model.state_dict()
        hyper = {k: v for k, v in state.items() if not k.startswith(_TRANSFORM_PREFIX)}
        if not refit:
            transform = {k[len(_TRANSFORM_PREFIX):]: v for k, v in state.items()
                         if k.startswith(_TRANSFORM_PREFIX)}
            model = self._build(X, Y, hyper=hyper, transform=transform)
            return self._finish(model, X, Y, t0, iterations=0, refit=False)
        model = self._build(X, Y, hyper=hyper)
        iterations, failed = self._refit(model)
        restarted, value = False, None
        self._refits += 1
        if self.restart_every and self._refits % self.restart_every == 0:
            cold = self._build(X, Y)
            value = self._mll(model)
            try:
                self._optimise(cold, self.fit_maxiter, max_attempts=1, options={})
                cold_value = self._mll(cold)
                if cold_value > value:
                    model, value, restarted = cold, cold_value, True
            except ModelFittingError:
                pass  # the warm model stands
        return self._finish(model, X, Y, t0, mll=value, iterations=iterations, refit=True, refit_failed=failed,
                            restarted=restarted)

    def fit_from(self, X: torch.Tensor, Y: torch.Tensor, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        """Fit on ``X: n x d``, ``Y: n x m`` starting from given hyperparameters (as returned by
        :meth:`hyperparameters`): the refit of :meth:`update` (fresh standardisation, at most
        ``update_maxiter`` L-BFGS-B iterations), from a recorded starting point instead of this
        object's own. The same inputs give the same model, in this process or a fresh one."""
        X, Y = check_training_data(X, Y)
        t0 = time.perf_counter()
        if not isinstance(hyperparameters, dict):
            raise ValueError(f"hyperparameters: a dict from ExactGP.hyperparameters(), not "
                             f"{type(hyperparameters).__name__}")
        hyper = {k: torch.as_tensor(v, dtype=torch.double, device=self.device)
                 for k, v in hyperparameters.items()}
        model = self._build(X, Y)
        expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(_TRANSFORM_PREFIX)}
        if set(hyper) != set(expected) or any(hyper[k].shape != expected[k] for k in expected):
            raise ValueError("hyperparameters: they belong to another model (other inputs, outcomes "
                             "or kernel); fit(X, Y) from scratch instead")
        model.load_state_dict(hyper, strict=False)  # as _build(hyper=...) does, on the model built once
        iterations, failed = self._refit(model)
        return self._finish(model, X, Y, t0, iterations=iterations, refit=True, refit_failed=failed)

    def hyperparameters(self) -> dict[str, Any]:
        """The fitted hyperparameters (raw values, standardisation excluded) as plain JSON:
        nested lists of floats, exact (a float64 survives ``tolist`` and JSON unchanged)."""
        return {k: v.detach().cpu().tolist() for k, v in self.model.state_dict().items()
                if not k.startswith(_TRANSFORM_PREFIX)}

    def _refit(self, model: SingleTaskGP) -> tuple[int, bool]:
        """The warm refit of ``model`` from its current hyperparameters (at most ``update_maxiter``
        L-BFGS-B iterations): (iterations, whether the refit failed and rolled back)."""
        failed = False
        iterations = 0
        if self.update_maxiter > 0:
            try:
                iterations = self._optimise(model, self.update_maxiter, max_attempts=1,
                                            options={"ftol": self.update_ftol})
            except ModelFittingError:
                failed = True  # the fit rolled back: the starting hyperparameters stand
        return iterations, failed

    def predict(self, X: torch.Tensor, observation_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive mean and variance at ``X: b x d``, each ``b x m``, in measured units (double).

        With ``observation_noise=True`` (default) ``var`` is the variance of a
        new *observation* at each point: the latent function's posterior
        variance plus the fitted observation noise. With ``False`` it is the
        latent function's posterior variance alone.
        """
        X = check_points(X, "X", d=self.train_X.shape[-1])
        with self._settings(), torch.no_grad():
            post = self.model.posterior(X.to(self.device, torch.double), observation_noise=observation_noise)
            mean, var = post.mean, post.variance.clamp_min(0.0)
        return mean.to(X.device), var.to(X.device)

    def with_data(self, X: torch.Tensor, Y: torch.Tensor) -> SingleTaskGP:
        """A new BoTorch model with this one's hyperparameters on other data (``X: n x d``,
        ``Y: n x m``; standardisation refreshed, no optimisation). This surrogate is not changed:
        a planner uses it to condition a trained version on every result there is now."""
        X, Y = check_training_data(X, Y, d=self.train_X.shape[-1], m=self._Y.shape[-1])
        hyper = {k: v for k, v in self.model.state_dict().items() if not k.startswith(_TRANSFORM_PREFIX)}
        model = self._build(X, Y, hyper=hyper)
        model.eval()
        return model

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint (CPU tensors and plain values): options, training data, hyperparameters, standardisation."""
        model = self.model
        return {
            "format": _FORMAT,
            "options": {"fit_maxiter": self.fit_maxiter, "update_maxiter": self.update_maxiter,
                        "update_ftol": self.update_ftol, "fit_timeout_s": self.fit_timeout_s,
                        "max_cholesky_size": self.max_cholesky_size, "restart_every": self.restart_every},
            "X": self.train_X.detach().cpu(),
            "Y": self._Y.detach().cpu(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | torch.device | None = None) -> Self:
        """Rebuild a surrogate from :meth:`state_dict`; it predicts exactly as the saved one did."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: not an ExactGP checkpoint (format {found!r}, expected {_FORMAT!r}); "
                             f"save one with ExactGP.save")
        gp = cls(**state["options"], device=device)
        X = state["X"].to(gp.device, torch.double)
        Y = state["Y"].to(gp.device, torch.double)
        transform = {k[len(_TRANSFORM_PREFIX):]: v for k, v in state["model"].items()
                     if k.startswith(_TRANSFORM_PREFIX)}
        model = gp._build(X, Y, transform=transform)
        model.load_state_dict({k: v.to(gp.device) for k, v in state["model"].items()})
        model.eval()
        gp._model, gp._X, gp._Y = model, X, Y
        return gp

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` (``torch.save``)."""
        torch.save(self.state_dict(), Path(path))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Self:
        """Read a checkpoint written by :meth:`save`."""
        return cls.from_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True), device=device)

    # ----------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _settings(self) -> Iterator[None]:
        with gpytorch.settings.max_cholesky_size(self.max_cholesky_size), gpytorch.settings.debug(False):
            yield

    def _build(self, X: torch.Tensor, Y: torch.Tensor, hyper: dict[str, torch.Tensor] | None = None,
               transform: dict[str, torch.Tensor] | None = None) -> SingleTaskGP:
        """A SingleTaskGP on the data, optionally with given hyperparameters and a frozen standardisation."""
        X = X.to(self.device, torch.double)
        Y = Y.to(self.device, torch.double)
        if transform is None:
            outcome_transform = Standardize(m=Y.shape[-1])
        else:  # apply the stored mean and scale instead of refitting them
            outcome_transform = FixedStandardize(m=Y.shape[-1])
            outcome_transform.load_state_dict(transform)
        outcome_transform.to(self.device, torch.double)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputDataWarning)  # inputs are checked above
            model = SingleTaskGP(X, Y, outcome_transform=outcome_transform)
        model.to(self.device)
        if hyper is not None:
            expected = {k for k in model.state_dict() if not k.startswith(_TRANSFORM_PREFIX)}
            assert set(hyper) == expected, set(hyper) ^ expected
            model.load_state_dict(hyper, strict=False)
        return model

    def _optimise(self, model: SingleTaskGP, maxiter: int, max_attempts: int, options: dict[str, Any]) -> int:
        """Run L-BFGS-B on the model's hyperparameters; return the iterations it took."""
        steps: list[int] = []

        def optimizer(mll: Any, closure: Any = None, **kwargs: Any) -> Any:
            result = fit_gpytorch_mll_scipy(mll, closure=closure, **kwargs)
            steps.append(int(result.step))
            return result

        options = {"maxiter": maxiter, **options}
        if "ftol" in options and model.num_outputs > 1:
            options["factr"] = None  # BoTorch's batched L-BFGS-B takes ftol only with factr unset
        optimizer_kwargs: dict[str, Any] = {"options": options}
        if self.fit_timeout_s is not None and model.num_outputs == 1:
            optimizer_kwargs["timeout_sec"] = self.fit_timeout_s
        with self._settings():
            fit_gpytorch_mll(CholeskyExactMLL(model.likelihood, model), optimizer=optimizer,
                             optimizer_kwargs=optimizer_kwargs, max_attempts=max_attempts)
        return sum(steps)

    def _mll(self, model: SingleTaskGP) -> float:
        """The fitted objective per point (marginal log likelihood plus log prior, averaged over outcomes)."""
        mll = CholeskyExactMLL(model.likelihood, model)
        model.train()
        with self._settings(), torch.no_grad():
            value = mll(model(*model.train_inputs), model.train_targets)
        model.eval()
        return float(value.mean())

    def _finish(self, model: SingleTaskGP, X: torch.Tensor, Y: torch.Tensor, t0: float,
                mll: float | None = None, **metrics: Any) -> dict[str, Any]:
        """Install ``model`` and report its metrics (``mll``: its :meth:`_mll`, when already known)."""
        value = self._mll(model) if mll is None else mll
        self._model = model
        self._X = X.to(self.device, torch.double)
        self._Y = Y.to(self.device, torch.double)
        return {"n": int(Y.shape[0]), "seconds": time.perf_counter() - t0, "mll": value, **metrics}


__all__ = ["CholeskyExactMLL", "ExactGP", "FixedStandardize"]
