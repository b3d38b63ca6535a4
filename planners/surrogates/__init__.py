"""Surrogate models that learn from results as they stream in, and checks on how far to trust them.

- :class:`ExactGP`: BoTorch ``SingleTaskGP`` with warm-started updates.
- :class:`DeepEnsemble`: K MLPs with mean and variance heads (Lakshminarayanan
  et al., NeurIPS 2017), a BoTorch ``EnsembleModel`` for acquisition functions.
- :class:`CalibrationTracker`: rolling coverage/NLL of predictions made before
  each result was trained on; :func:`inflate` widens a model's posterior when
  it proves overconfident.
- :func:`ood_score`: distance from the training data in units of its spacing.

Every surrogate takes encoded points ``X: n x d`` in the unit cube and raw
outcomes ``Y: n x m``, and offers ``fit``, ``update`` (all data so far,
warm-started), ``predict``, ``model`` and ``save``/``load``
(:class:`Surrogate`). Tensors live on ``cuda`` when there is one, else the CPU.
"""

from typing import Any

from planners.surrogates.base import Surrogate, resolve_device
from planners.surrogates.calibration import CalibrationTracker, InflatedModel, inflate
from planners.surrogates.ensemble import DeepEnsemble, EnsembleSurrogateModel
from planners.surrogates.gp import ExactGP
from planners.surrogates.ood import ood_score


def __getattr__(name: str) -> Any:
    # The trainer (planners/surrogates/trainer.py) is imported on first use only: it is
    # not needed to fit or use a model, and loading it here would tie this package's
    # import to it.
    if name == "SurrogateTrainer":
        from planners.surrogates.trainer import SurrogateTrainer

        return SurrogateTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CalibrationTracker",
    "DeepEnsemble",
    "EnsembleSurrogateModel",
    "ExactGP",
    "InflatedModel",
    "Surrogate",
    "inflate",
    "ood_score",
    "resolve_device",
]
