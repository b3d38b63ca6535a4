"""Deep-ensemble surrogate: K small MLPs, each predicting a mean and a variance, trained on Gaussian NLL.

Lakshminarayanan, Pritzel and Blundell, "Simple and Scalable Predictive
Uncertainty Estimation using Deep Ensembles", NeurIPS 2017: every member is
an MLP with a mean head and a variance head, trained on the Gaussian negative
log likelihood from its own random initialisation and its own random
mini-batches (and here its own validation split for early stopping); the
ensemble predicts the moments of the uniform mixture of the members'
Gaussians. Two additions, both measured on noisy Hartmann6:
  - the loss is weighted as in beta-NLL (Seitzer et al., "On the Pitfalls of
    Heteroscedastic Uncertainty Estimation with Probabilistic Neural
    Networks", ICLR 2022), which has the same optimum but learns the means
    much better (500 points: RMSE 0.19 against 0.24); ``beta=0`` is the
    paper's plain NLL;
  - each member's variance is rescaled on its own held-out rows so that
    ``E[z^2] = 1`` there ("std scaling", Levi et al., "Evaluating and
    Calibrating Uncertainty Prediction in Regression Tasks", Sensors 2022).
    Warm-started updates keep training the same weights, which left
    unchecked makes the variance heads overconfident: 95 % coverage fell
    from 0.90 to 0.78 over 20 single-point updates at 500 points; rescaled,
    it stays at or above 0.95 (conservative: the members' spread adds to it).
The K members are evaluated as one batched network (``K x ...`` weight
tensors), so training K members costs about as much as one.

For BoTorch the ensemble is an :class:`botorch.models.ensemble.EnsembleModel`
whose posterior samples are the K members' mean functions (epistemic
uncertainty: what a different, equally good fit would predict), which is
what Monte-Carlo acquisition functions such as qLogNoisyExpectedImprovement
integrate over; the members' noise heads stay out of it, as a GP's
observation noise stays out of its latent posterior.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import torch
from botorch.models.ensemble import EnsembleModel
from torch import nn

from planners.surrogates.base import check_points, check_training_data, resolve_device

_FORMAT = "labpilot.surrogates.DeepEnsemble/1"
#: Floor on each member's predicted variance, in standardised units.
_MIN_VAR = 1e-6
#: Below this many points there is no validation split: every point is trained on.
_MIN_POINTS_FOR_VALIDATION = 20
_PREDICT_CHUNK = 8192
#: Held-out variance scaling: pseudo-rows at scale 1 that the estimate shrinks towards, and its range.
_VAR_SCALE_PRIOR = 5.0
_VAR_SCALE_MIN, _VAR_SCALE_MAX = 0.1, 100.0


class MemberStack(nn.Module):
    """K independent MLPs (SiLU) evaluated as one batched network.

    Input ``... x K' x n x d`` with ``K'`` either ``K`` (one batch of rows per
    member) or 1 (the same rows for every member); output the members' means
    and variances, each ``... x K x n x m`` (variance = softplus + a floor).
    Each member's weights are drawn from its own seed, as ``torch.nn.Linear``
    draws them.
    """

    def __init__(self, members: int, d: int, m: int, hidden: Sequence[int], seed: int) -> None:
        super().__init__()
        sizes = [d, *hidden, 2 * m]
        self.m = m
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(members)]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1.0 / math.sqrt(fan_in)
            W = torch.empty(members, fan_in, fan_out)
            b = torch.empty(members, 1, fan_out)
            for k, g in enumerate(generators):
                W[k].uniform_(-bound, bound, generator=g)
                b[k].uniform_(-bound, bound, generator=g)
            self.weights.append(nn.Parameter(W))
            self.biases.append(nn.Parameter(b))

    @property
    def members(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = Z
        last = len(self.weights) - 1
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.matmul(h, W) + b
            if i < last:
                h = nn.functional.silu(h)
        mean, raw = h[..., : self.m], h[..., self.m:]
        return mean, nn.functional.softplus(raw) + _MIN_VAR


def _gaussian_nll(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Per-member Gaussian NLL (constant dropped), ``K x n x m`` -> ``K`` (mean over points and outcomes).

    ``beta > 0`` weights each term by ``var ** beta`` held constant (beta-NLL,
    Seitzer et al., "On the Pitfalls of Heteroscedastic Uncertainty Estimation
    with Probabilistic Neural Networks", ICLR 2022): the same optimum, but
    points the model calls noisy no longer stop the mean from being learnt.
    """
    nll = 0.5 * (var.log() + (y - mean).pow(2) / var)
    if beta:
        nll = nll * var.detach().pow(beta)
    return nll.mean(dim=(-2, -1))


class EnsembleSurrogateModel(EnsembleModel):
    """BoTorch view of a :class:`DeepEnsemble`: ``posterior(X)`` is an ``EnsemblePosterior``.

    ``forward``: ``batch x q x d`` (unit cube, any float dtype) -> ``batch x K x q x m``,
    the K members' predicted means in measured units, in ``X``'s dtype. A frozen
    snapshot: later training of the ensemble does not change it.
    """

    def __init__(self, net: MemberStack, y_mean: torch.Tensor, y_std: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("y_mean", y_mean)
        self.register_buffer("y_std", y_std)
        self._num_outputs = int(y_mean.shape[-1])

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size([])

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        Z = (2.0 * X - 1.0).to(self.y_mean.dtype).unsqueeze(-3)
        mean, _ = self.net(Z)
        return (mean * self.y_std + self.y_mean).to(X.dtype)


class DeepEnsemble:
    """A deep ensemble on ``m`` outcomes over the unit cube (Lakshminarayanan et al., NeurIPS 2017).

    Args:
        members: ensemble size K.
        hidden: widths of the hidden layers (SiLU).
        max_steps: Adam steps per member in :meth:`fit` (mini-batches of
            ``batch_size`` rows, or the whole training split when smaller).
        update_fraction: an :meth:`update` continues from the current weights
            for this fraction of the steps the last fit took.
        batch_size, lr, weight_decay: Adam(W) settings.
        beta: the training loss is beta-NLL (:func:`_gaussian_nll`); 0 is the
            plain Gaussian NLL of the paper. Early stopping uses the plain NLL.
        val_fraction: share of the points each member holds out (its own
            random split, kept through updates) for early stopping and for
            rescaling its variance; none below 20 points.
        patience_steps: stop a member after this many steps without a better
            validation NLL; every member keeps its best weights.
        eval_every: steps between validation checks.
        seed: seeds the members' initialisations, splits and mini-batches.
        device: ``cuda``/``cpu``; ``None`` picks ``cuda`` when there is one.
        dtype: training precision (float32 by default; predictions are returned in double).
    """

    def __init__(self, *, members: int = 5, hidden: Sequence[int] = (64, 64), max_steps: int = 2000,
                 update_fraction: float = 0.2, batch_size: int = 256, lr: float = 1e-2,
                 weight_decay: float = 1e-4, beta: float = 0.5, val_fraction: float = 0.1,
                 patience_steps: int = 300, eval_every: int = 25, seed: int = 0, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if int(members) < 2:
            raise ValueError(f"members: an ensemble needs at least 2 members, got {members}")
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden: give one or more positive layer widths, e.g. (64, 64); got {hidden!r}")
        for name, value in (("max_steps", max_steps), ("batch_size", batch_size),
                            ("patience_steps", patience_steps), ("eval_every", eval_every)):
            if int(value) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value}")
        if not 0 < update_fraction <= 1:
            raise ValueError(f"update_fraction: must be in (0, 1], got {update_fraction}")
        if not 0 <= val_fraction < 0.5:
            raise ValueError(f"val_fraction: must be in [0, 0.5), got {val_fraction}")
        if not 0 <= beta <= 1:
            raise ValueError(f"beta: must be in [0, 1] (0: plain Gaussian NLL), got {beta}")
        if not lr > 0 or not weight_decay >= 0:
            raise ValueError(f"lr, weight_decay: need lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: use torch.float32 or torch.float64, got {dtype}")
        self.options: dict[str, Any] = {
            "members": int(members), "hidden": [int(h) for h in hidden], "max_steps": int(max_steps),
            "update_fraction": float(update_fraction), "batch_size": int(batch_size), "lr": float(lr),
            "weight_decay": float(weight_decay), "beta": float(beta), "val_fraction": float(val_fraction),
            "patience_steps": int(patience_steps), "eval_every": int(eval_every), "seed": int(seed),
            "dtype": str(dtype).removeprefix("torch."),
        }
        self.device = resolve_device(device)
        self.dtype = dtype
        self.net: MemberStack | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._generator: torch.Generator | None = None
        self._model: EnsembleSurrogateModel | None = None
        self._X: torch.Tensor | None = None
        self._Y: torch.Tensor | None = None
        self._y_mean = self._y_std = torch.empty(0)
        self._val_idx = torch.empty(0, 0, dtype=torch.long)
        self._var_scale = torch.empty(0)
        self._fit_steps = 0

    # ----------------------------------------------------------------- public API

    @property
    def model(self) -> EnsembleSurrogateModel:
        """A frozen BoTorch snapshot of the current ensemble (a new one after every fit/update)."""
        if self._model is None:
            raise RuntimeError("DeepEnsemble.model: the surrogate has not been fitted; call fit(X, Y) first")
        return self._model

    @property
    def train_X(self) -> torch.Tensor:
        """``n x d`` training points (double)."""
        self._require_fitted("train_X")
        return self._X

    @property
    def train_Y(self) -> torch.Tensor:
        """``n x m`` training outcomes in measured units (double)."""
        self._require_fitted("train_Y")
        return self._Y

    def fit(self, X: torch.Tensor, Y: torch.Tensor) -> dict[str, Any]:
        """Train from fresh random weights on ``X: n x d`` (unit cube) and ``Y: n x m`` (raw outcomes).

        Returns metrics: ``n``, ``seconds``, ``steps`` (Adam steps taken),
        ``stopped_early``, ``val_nll`` (mean over members of the best
        validation Gaussian NLL in standardised units, constant dropped;
        ``None`` without a validation split) and ``train_nll``.
        """
        X, Y = check_training_data(X, Y)
        t0 = time.perf_counter()
        o = self.options
        self._generator = torch.Generator(device=self.device).manual_seed(o["seed"])
        self.net = MemberStack(o["members"], X.shape[-1], Y.shape[-1], o["hidden"], o["seed"]).to(
            self.device, self.dtype)
        self._optimizer = torch.optim.AdamW(self.net.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        self._set_data(X, Y)
        n = X.shape[0]
        n_val = round(o["val_fraction"] * n) if n >= _MIN_POINTS_FOR_VALIDATION else 0
        n_val = n_val if n_val >= 2 else 0
        # each member's own validation rows: the first n_val of its own random permutation
        perm = torch.argsort(torch.rand(o["members"], n, generator=self._generator, device=self.device), dim=1)
        self._val_idx = perm[:, :n_val]
        metrics = self._train(o["max_steps"])
        self._fit_steps = metrics["steps"]
        return self._finish(t0, metrics)

    def update(self, X: torch.Tensor, Y: torch.Tensor) -> dict[str, Any]:
        """Retrain on ALL the data so far (``X: n x d``, ``Y: n x m``; old points, then new), warm-started.

        Continues from the current weights (and Adam state) for
        ``update_fraction`` of the steps the last :meth:`fit` took (at least
        ``eval_every``), with early stopping as in a fit. The standardisation
        is refreshed and the mean heads are rescaled to match, so the
        refreshed network predicts what it did. Each member keeps the
        validation rows it was fitted with (rows it has never trained on, so
        early stopping stays honest); new rows are always trained on. An
        ensemble fitted on fewer than 20 points has no validation rows until
        it is fitted again: refit from scratch now and then (say when the data
        has doubled). With no model yet, this is :meth:`fit`. Returns the
        metrics of :meth:`fit`.
        """
        if self.net is None:
            return self.fit(X, Y)
        X, Y = check_training_data(X, Y, d=self._X.shape[-1], m=self._Y.shape[-1])
        t0 = time.perf_counter()
        if self._val_idx.numel() and int(self._val_idx.max()) >= X.shape[0]:
            raise ValueError(f"X: update needs all {self._X.shape[0]} points seen so far, then the new ones; "
                             f"got {X.shape[0]}; call fit() to start over on other data")
        old_mean, old_std = self._y_mean, self._y_std
        self._set_data(X, Y)
        self._rescale_mean_heads(old_mean, old_std)
        o = self.options
        steps = min(o["max_steps"], max(o["eval_every"], math.ceil(o["update_fraction"] * self._fit_steps)))
        return self._finish(t0, self._train(steps))

    def predict(self, X: torch.Tensor, observation_noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixture mean and variance at ``X: b x d``, each ``b x m`` in measured units (double).

        ``mean`` is the average of the members' means; with
        ``observation_noise=True`` (default) ``var = mean_k(var_k + mu_k^2) - mean^2``,
        the variance of a new observation under the equal-weight mixture of the
        members' Gaussians (``var_k``: member k's variance head times its
        held-out scale). With ``False``,
        ``var = mean_k(mu_k^2) - mean^2``: the spread of the members' means
        alone (epistemic), as the BoTorch ``model``'s samples have it.
        """
        self._require_fitted("predict")
        X = check_points(X, "X", d=self._X.shape[-1])
        means, variances = [], []
        with torch.no_grad():
            for start in range(0, X.shape[0], _PREDICT_CHUNK):
                Z = self._scale_x(X[start:start + _PREDICT_CHUNK]).unsqueeze(0)  # 1 x b x d
                mu, var = self.net(Z)  # K x b x m (standardised)
                mu = mu.double() * self._y_std.double() + self._y_mean.double()
                var = var.double() * self._var_scale.double().unsqueeze(1) * self._y_std.double() ** 2
                mean = mu.mean(0)
                spread = (mu - mean).pow(2).mean(0)
                means.append(mean)
                variances.append(spread + var.mean(0) if observation_noise else spread)
        return torch.cat(means).to(X.device), torch.cat(variances).to(X.device)

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint (CPU tensors and plain values): options, data, weights, standardisation, Adam and RNG state."""
        self._require_fitted("state_dict")

        def cpu(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return obj.detach().cpu()
            if isinstance(obj, dict):
                return {k: cpu(v) for k, v in obj.items()}
            if isinstance(obj, list | tuple):
                return type(obj)(cpu(v) for v in obj)
            return obj

        return {
            "format": _FORMAT, "options": dict(self.options),
            "X": self._X.cpu(), "Y": self._Y.cpu(),
            "y_mean": self._y_mean.cpu(), "y_std": self._y_std.cpu(),
            "net": cpu(self.net.state_dict()),
            "optimizer": cpu(self._optimizer.state_dict()),
            "rng": self._generator.get_state().cpu(), "rng_device": self.device.type,
            "val_idx": self._val_idx.cpu(), "fit_steps": self._fit_steps, "var_scale": self._var_scale.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | torch.device | None = None) -> Self:
        """Rebuild an ensemble from :meth:`state_dict`; it predicts exactly as the saved one did."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"state: not a DeepEnsemble checkpoint (expected format {_FORMAT!r}); "
                             f"save one with DeepEnsemble.save")
        options = dict(state["options"])
        options["dtype"] = getattr(torch, options["dtype"])
        ens = cls(**options, device=device)
        o = ens.options
        X, Y = state["X"], state["Y"]
        ens.net = MemberStack(o["members"], X.shape[-1], Y.shape[-1], o["hidden"], o["seed"]).to(
            ens.device, ens.dtype)
        ens.net.load_state_dict(state["net"])
        ens._optimizer = torch.optim.AdamW(ens.net.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        ens._optimizer.load_state_dict(state["optimizer"])
        ens._generator = torch.Generator(device=ens.device)
        if state["rng_device"] == ens.device.type:
            ens._generator.set_state(state["rng"])
        else:  # CPU and CUDA generators keep different states: start this device's stream afresh
            ens._generator.manual_seed(o["seed"])
        ens._X = X.to(ens.device, torch.double)
        ens._Y = Y.to(ens.device, torch.double)
        ens._y_mean = state["y_mean"].to(ens.device, ens.dtype)
        ens._y_std = state["y_std"].to(ens.device, ens.dtype)
        ens._val_idx = state["val_idx"].to(ens.device)
        ens._fit_steps = int(state["fit_steps"])
        ens._var_scale = state["var_scale"].to(ens.device, ens.dtype)
        ens._model = ens._snapshot()
        return ens

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` (``torch.save``)."""
        torch.save(self.state_dict(), Path(path))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Self:
        """Read a checkpoint written by :meth:`save`."""
        return cls.from_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True), device=device)

    # ----------------------------------------------------------------- internals

    def _require_fitted(self, what: str) -> None:
        if self.net is None:
            raise RuntimeError(f"DeepEnsemble.{what}: the surrogate has not been fitted; call fit(X, Y) first")

    def _scale_x(self, X: torch.Tensor) -> torch.Tensor:
        """Unit cube -> ``[-1, 1]``, in the training dtype on the device."""
        return (2.0 * X - 1.0).to(self.device, self.dtype)

    def _set_data(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        self._X = X.to(self.device, torch.double)
        self._Y = Y.to(self.device, torch.double)
        mean = self._Y.mean(0)
        std = self._Y.std(0) if Y.shape[0] > 1 else torch.ones_like(mean)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # a constant outcome: unit scale
        self._y_mean, self._y_std = mean.to(self.dtype), std.to(self.dtype)

    def _rescale_mean_heads(self, old_mean: torch.Tensor, old_std: torch.Tensor) -> None:
        """Make the mean heads predict the same measured values under the new standardisation."""
        m = self._Y.shape[-1]
        ratio = old_std / self._y_std
        shift = (old_mean - self._y_mean) / self._y_std
        with torch.no_grad():
            self.net.weights[-1][..., :m].mul_(ratio)
            self.net.biases[-1][..., :m].mul_(ratio).add_(shift)

    def _train(self, steps: int) -> dict[str, Any]:
        """At most ``steps`` Adam steps on every member's loss, on all rows but the member's validation rows."""
        o, net, g = self.options, self.net, self._generator
        K, dev = o["members"], self.device
        Z, T = self._scale_x(self._X), ((self._Y.to(self.dtype) - self._y_mean) / self._y_std)
        n = Z.shape[0]
        val_idx = self._val_idx
        n_val = val_idx.shape[1]
        trained = torch.ones(K, n, dtype=torch.bool, device=dev)
        trained.scatter_(1, val_idx, False)
        train_idx = torch.arange(n, device=dev).expand(K, n)[trained].view(K, n - n_val)
        n_train = n - n_val
        batch = min(o["batch_size"], n_train)
        Zv, Tv = Z[val_idx], T[val_idx]  # K x n_val x d, K x n_val x m
        best = torch.full((K,), math.inf, device=dev)
        best_step = torch.zeros(K, dtype=torch.long, device=dev)
        best_params = [p.detach().clone() for p in net.parameters()]
        net.train()
        step = 0
        stopped_early = False
        while step < steps:
            if batch < n_train:
                rows = torch.randint(n_train, (K, batch), generator=g, device=dev)
                idx = torch.gather(train_idx, 1, rows)
            else:
                idx = train_idx
            mean, var = net(Z[idx])
            loss = _gaussian_nll(mean, var, T[idx], o["beta"]).sum()  # members share no weights: independent fits
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            step += 1
            if n_val and (step % o["eval_every"] == 0 or step == steps):
                with torch.no_grad():
                    val = _gaussian_nll(*net(Zv), Tv)
                better = val < best
                if bool(better.any()):
                    best = torch.where(better, val, best)
                    best_step = torch.where(better, torch.full_like(best_step, step), best_step)
                    for p, bp in zip(net.parameters(), best_params, strict=True):
                        bp[better] = p.detach()[better]
                if bool((step - best_step >= o["patience_steps"]).all()):
                    stopped_early = step < steps
                    break
        net.eval()
        self._var_scale = torch.ones(K, T.shape[-1], device=dev, dtype=self.dtype)
        if n_val:
            with torch.no_grad():
                for p, bp in zip(net.parameters(), best_params, strict=True):
                    p.copy_(bp)
                # held-out variance scaling: E[z^2] = 1 on the member's own validation rows
                mean, var = net(Zv)
                z2 = ((Tv - mean).pow(2) / var).sum(1)  # K x m
                scale = (z2 + _VAR_SCALE_PRIOR) / (n_val + _VAR_SCALE_PRIOR)
                self._var_scale = scale.clamp(_VAR_SCALE_MIN, _VAR_SCALE_MAX)
        with torch.no_grad():
            train_nll = float(_gaussian_nll(*net(Z.unsqueeze(0)), T.unsqueeze(0)).mean())
        return {"steps": step, "stopped_early": stopped_early,
                "val_nll": float(best.mean()) if n_val else None, "train_nll": train_nll}

    def _snapshot(self) -> EnsembleSurrogateModel:
        # in double: acquisition optimisers (L-BFGS-B) stall on float32 round-off
        net = copy.deepcopy(self.net).to(torch.double).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return EnsembleSurrogateModel(net, self._y_mean.double(), self._y_std.double())

    def _finish(self, t0: float, metrics: dict[str, Any]) -> dict[str, Any]:
        self._model = self._snapshot()
        return {"n": int(self._X.shape[0]), "seconds": time.perf_counter() - t0, **metrics}


__all__ = ["DeepEnsemble", "EnsembleSurrogateModel", "MemberStack"]
