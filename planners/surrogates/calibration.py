"""Is the surrogate's uncertainty honest? Rolling calibration of its predictions, and a posterior inflater.

:class:`CalibrationTracker` scores each prediction made *before* its result
was trained on (the only honest test of a surrogate that learns as results
stream in): coverage of the central 68 % and 95 % Gaussian intervals and the
Gaussian negative log likelihood over a rolling window (and over the whole
campaign), a binomial test for under-coverage, and the factor by which the
predictive standard deviations would have to grow to be calibrated.

:func:`inflate` applies such a factor to a BoTorch model: same posterior
mean, covariance times ``factor**2``, so that acquisition functions explore
more where the model has proved overconfident.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from botorch.acquisition.objective import PosteriorTransform
from botorch.models.model import Model
from botorch.posteriors import GPyTorchPosterior, Posterior, PosteriorList
from botorch.posteriors.ensemble import EnsemblePosterior
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal

#: Half-widths, in standard deviations, of the central 68.27 % (+-1 sd under the
#: usual rounding Phi^-1(0.84) = 0.9945) and 95 % Gaussian intervals.
Z68 = 0.9945
Z95 = 1.96
#: Phi^-1(0.75): the median of |Z| for a standard normal Z.
MEDIAN_ABS_Z = 0.6745
NOMINAL_68 = math.erf(Z68 / math.sqrt(2))  # P(|Z| <= 0.9945) = 0.6800
NOMINAL_95 = 0.95


def binomial_lower_bound(n: int, p: float = NOMINAL_95, alpha: float = 0.01) -> int:
    """Smallest ``k`` with ``P(Binomial(n, p) <= k) >= alpha``: fewer than ``k`` hits has probability < ``alpha``."""
    if n <= 0:
        return 0
    cdf = 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    for k in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                        + k * log_p + (n - k) * log_q)
        if cdf >= alpha:
            return k
    return n


@dataclass
class _RunningScore:
    """Running sums of scored values: what whole-campaign coverage and NLL need, in constant memory."""

    count: int = 0
    hits_68: int = 0
    hits_95: int = 0
    nll_sum: float = 0.0

    def add(self, z: float, nll: float) -> None:
        self.count += 1
        self.hits_68 += abs(z) <= Z68
        self.hits_95 += abs(z) <= Z95
        self.nll_sum += nll

    def figures(self) -> dict[str, Any]:
        if self.count == 0:
            return {"count": 0, "coverage_68": None, "coverage_95": None, "nll": None}
        return {"count": self.count, "coverage_68": self.hits_68 / self.count,
                "coverage_95": self.hits_95 / self.count, "nll": self.nll_sum / self.count}


class CalibrationTracker:
    """Rolling calibration of Gaussian predictions ``N(mean, sd^2)`` against what was then observed.

    Record each result with the prediction the model made for it *before* it
    was trained on it. The window holds the last ``window`` results; each
    result may carry several outcomes, scored per outcome and pooled
    ("overall"). :meth:`totals` gives the same figures over every result
    recorded, from running sums.

    For a standardised residual ``z = (y - mean) / sd``: an interval covers
    when ``|z| <= 0.9945`` (68 %) or ``|z| <= 1.96`` (95 %); the Gaussian NLL
    is ``0.5 log(2 pi sd^2) + 0.5 z^2`` (natural log, measured units).

    Args:
        window: how many of the latest results to score.
        min_count: fewer scored values than this and nothing is flagged
            (``under_covered`` is False, ``inflation`` is 1).
        alpha: false-alarm rate of the under-coverage test.
    """

    def __init__(self, window: int = 50, min_count: int = 10, alpha: float = 0.01) -> None:
        if int(window) < 1:
            raise ValueError(f"window: must be a positive number of results, got {window}")
        if int(min_count) < 1:
            raise ValueError(f"min_count: must be at least 1, got {min_count}")
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha: must be in (0, 0.5), got {alpha}")
        self.window = int(window)
        self.min_count = int(min_count)
        self.alpha = float(alpha)
        #: one dict per result: outcome -> (z, nll)
        self._results: deque[dict[str, tuple[float, float]]] = deque(maxlen=self.window)
        #: every result recorded, the window's and those that left it
        self._recorded = 0
        self._overall_total = _RunningScore()
        self._outcome_totals: dict[str, _RunningScore] = {}

    def __len__(self) -> int:
        """Results in the window."""
        return len(self._results)

    def record(self, mean: Mapping[str, float], sd: Mapping[str, float], observed: Mapping[str, float]) -> None:
        """Score one result: ``observed[name]`` against ``N(mean[name], sd[name]^2)`` for every observed outcome.

        Outcomes predicted but not observed are skipped; an observed outcome
        without a prediction, a non-finite value or ``sd <= 0`` raise
        ``ValueError`` and record nothing.
        """
        if not observed:
            raise ValueError("observed: no outcomes; record a result with at least one measured outcome")
        scored: dict[str, tuple[float, float]] = {}
        for name, y in observed.items():
            if name not in mean or name not in sd:
                raise ValueError(f"observed[{name!r}]: no prediction for this outcome; pass mean[{name!r}] "
                                 f"and sd[{name!r}] as predicted before the result was trained on")
            y, mu, s = float(y), float(mean[name]), float(sd[name])
            if not (math.isfinite(y) and math.isfinite(mu)):
                raise ValueError(f"{name!r}: observed {y} and mean {mu} must be finite")
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"sd[{name!r}]: must be a positive finite standard deviation, got {s}")
            z = (y - mu) / s
            scored[name] = (z, 0.5 * math.log(2 * math.pi * s * s) + 0.5 * z * z)
        self._results.append(scored)
        self._recorded += 1
        for name, (z, nll) in scored.items():
            self._overall_total.add(z, nll)
            self._outcome_totals.setdefault(name, _RunningScore()).add(z, nll)

    def _scored(self, outcome: str | None) -> list[tuple[float, float]]:
        if outcome is None:
            return [v for result in self._results for v in result.values()]
        return [result[outcome] for result in self._results if outcome in result]

    def _stats(self, outcome: str | None) -> dict[str, Any]:
        scored = self._scored(outcome)
        n = len(scored)
        if n == 0:
            return {"count": 0, "coverage_68": None, "coverage_95": None, "nll": None,
                    "under_covered": False, "inflation": 1.0}
        abs_z = [abs(z) for z, _ in scored]
        hits95 = sum(a <= Z95 for a in abs_z)
        enough = n >= self.min_count
        scale = statistics.median(abs_z) / MEDIAN_ABS_Z
        return {
            "count": n,
            "coverage_68": sum(a <= Z68 for a in abs_z) / n,
            "coverage_95": hits95 / n,
            "nll": sum(nll for _, nll in scored) / n,
            "under_covered": enough and hits95 < binomial_lower_bound(n, NOMINAL_95, self.alpha),
            "inflation": min(max(scale, 1.0), 10.0) if enough else 1.0,
        }

    def summary(self) -> dict[str, Any]:
        """Window statistics: ``{"results", "window", "overall": {...}, "outcomes": {name: {...}}}``.

        Each ``{...}`` holds ``count`` (scored values), ``coverage_68``,
        ``coverage_95``, ``nll`` (mean Gaussian NLL; ``None`` when empty),
        ``under_covered`` and ``inflation`` (see those methods).
        """
        names = sorted({name for result in self._results for name in result})
        return {"results": len(self._results), "window": self.window, "overall": self._stats(None),
                "outcomes": {name: self._stats(name) for name in names}}

    def totals(self) -> dict[str, Any]:
        """Figures over every result recorded so far, not only the window (a whole campaign's):
        ``{"results", "overall": {...}, "outcomes": {name: {...}}}``.

        Each ``{...}`` holds ``count``, ``coverage_68``, ``coverage_95`` and ``nll``, defined as in
        :meth:`summary` (``None`` when empty). Kept as running sums, so memory does not grow with
        the campaign. The under-coverage test and the inflation factor are the window's alone:
        they say how the model does now, which is what the planner acts on.
        """
        outcomes = {name: self._outcome_totals[name].figures() for name in sorted(self._outcome_totals)}
        return {"results": self._recorded, "overall": self._overall_total.figures(), "outcomes": outcomes}

    def under_covered(self, outcome: str | None = None) -> bool:
        """True when the 95 % intervals cover clearly less than 95 % (all outcomes pooled, or ``outcome``).

        "Clearly": with ``n >= min_count`` scored values, fewer hits than the
        ``alpha`` (1 %) quantile of ``Binomial(n, 0.95)``, so a calibrated
        model is flagged less than 1 % of the time. At ``n = 50`` that means
        42 or fewer hits (coverage <= 0.84).
        """
        return bool(self._stats(outcome)["under_covered"])

    def inflation(self, outcome: str | None = None) -> float:
        """Factor (>= 1) by which predictive sds should grow for the window to be calibrated.

        The robust scale of the standardised residuals, ``median(|z|) / 0.6745``
        (1 for calibrated Gaussian predictions), clipped to ``[1, 10]``; 1 with
        fewer than ``min_count`` values. Sampling noise makes it about 1 +- 0.1
        for a calibrated window of 50.
        """
        return float(self._stats(outcome)["inflation"])


# --------------------------------------------------------------------- inflate


def _inflate_posterior(posterior: Posterior, factor: float) -> Posterior:
    """Same mean, every deviation from it times ``factor`` (covariance times ``factor**2``)."""
    if isinstance(posterior, EnsemblePosterior):
        # uniform or given member weights alike: values - mean is each member's deviation
        mean = posterior.mean.unsqueeze(-3)
        return EnsemblePosterior(values=mean + factor * (posterior.values - mean), weights=posterior.weights)
    if isinstance(posterior, PosteriorList):
        return PosteriorList(*(_inflate_posterior(p, factor) for p in posterior.posteriors))
    if type(posterior) is GPyTorchPosterior:
        mvn = posterior.distribution
        covariance = mvn.lazy_covariance_matrix * (factor * factor)
        if isinstance(mvn, MultitaskMultivariateNormal):
            scaled = MultitaskMultivariateNormal(mvn.mean, covariance, interleaved=mvn._interleaved)
        elif isinstance(mvn, MultivariateNormal):
            scaled = MultivariateNormal(mvn.mean, covariance)
        else:
            raise TypeError(f"inflate: cannot scale a {type(mvn).__name__} posterior distribution")
        return GPyTorchPosterior(scaled)
    raise TypeError(f"inflate: posteriors of type {type(posterior).__name__} are not supported; use a model "
                    f"whose posterior is Gaussian (GPyTorchPosterior), an EnsemblePosterior or a list of them")


class InflatedModel(Model):
    """A BoTorch model whose posterior is ``base_model``'s with its covariance times ``factor**2``.

    ``posterior(X)`` for ``X: batch x q x d`` has the base model's mean
    (``batch x q x m``) and every sample's deviation from it scaled by
    ``factor``; a posterior transform, if given, is applied after scaling.
    """

    def __init__(self, base_model: Model, factor: float) -> None:
        super().__init__()
        self.base_model = base_model
        self.factor = float(factor)

    @property
    def num_outputs(self) -> int:
        return self.base_model.num_outputs

    @property
    def batch_shape(self) -> torch.Size:
        return self.base_model.batch_shape

    def posterior(self, X: torch.Tensor, output_indices: list[int] | None = None,
                  observation_noise: bool | torch.Tensor = False,
                  posterior_transform: PosteriorTransform | None = None, **kwargs: Any) -> Posterior:
        posterior = self.base_model.posterior(X, output_indices=output_indices,
                                              observation_noise=observation_noise, **kwargs)
        posterior = _inflate_posterior(posterior, self.factor)
        return posterior if posterior_transform is None else posterior_transform(posterior)


def inflate(model: Model, factor: float) -> InflatedModel:
    """Wrap ``model`` so its posterior keeps the mean and has covariance times ``factor**2``.

    Works for models whose posterior is a ``GPyTorchPosterior`` (``SingleTaskGP``,
    ``ModelListGP`` of GPs, with linear outcome transforms such as
    ``Standardize``), an ``EnsemblePosterior`` (:class:`DeepEnsemble`'s model:
    the members' deviations from the ensemble mean are scaled) or a
    ``PosteriorList`` of those. Typical use: ``inflate(model, tracker.inflation())``
    when ``tracker.under_covered()``.
    """
    if not isinstance(model, Model):
        raise TypeError(f"model: expected a BoTorch Model, got {type(model).__name__}; pass surrogate.model")
    factor = float(factor)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor: must be a positive finite number (1 leaves the model as it is), got {factor}")
    return InflatedModel(model, factor)


__all__ = ["CalibrationTracker", "InflatedModel", "binomial_lower_bound", "inflate"]
