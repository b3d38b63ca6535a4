"""What every surrogate offers (fit, update, predict, model, save/load), and the input checks they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import torch
from botorch.models.model import Model

#: How far outside ``[0, 1]`` an encoded coordinate may stray (rounding) before it is refused.
UNIT_CUBE_TOLERANCE = 1e-6


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` when given, else ``cuda`` when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device; pass 'cpu', 'cuda' or None") from exc


def check_points(X: Any, name: str = "X", d: int | None = None) -> torch.Tensor:
    """Check that ``X`` is a finite ``n x d`` tensor of encoded points in the unit cube; return it."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape n x d, got {type(X).__name__}; "
                        f"wrap it with torch.as_tensor(..., dtype=torch.double)")
    if X.ndim != 2:
        raise ValueError(f"{name}: expected an n x d tensor, got shape {tuple(X.shape)}; "
                         f"use {name}.reshape(-1, d) for a flat batch of points")
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{name}: needs at least one point with at least one coordinate, got shape "
                         f"{tuple(X.shape)}")
    if d is not None and X.shape[1] != d:
        raise ValueError(f"{name}: expected d={d} coordinates per point, as in the training data, got "
                         f"{X.shape[1]}; encode points with the same search space")
    if not X.is_floating_point() or not torch.isfinite(X).all():
        raise ValueError(f"{name}: every coordinate must be a finite float; drop or repair rows with "
                         f"NaN/inf")
    if (X < -UNIT_CUBE_TOLERANCE).any() or (X > 1 + UNIT_CUBE_TOLERANCE).any():
        raise ValueError(f"{name}: coordinates must lie in the unit cube [0, 1] (got min {float(X.min()):.4g}, "
                         f"max {float(X.max()):.4g}); encode points with SearchSpace.encode first")
    return X


def check_training_data(X: Any, Y: Any, d: int | None = None, m: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``X: n x d`` (unit cube) and ``Y: n x m`` (finite, raw outcome values); return them."""
    X = check_points(X, "X", d)
    if not isinstance(Y, torch.Tensor):
        raise TypeError(f"Y: expected a torch.Tensor of shape n x m, got {type(Y).__name__}")
    if Y.ndim != 2:
        raise ValueError(f"Y: expected an n x m tensor (one column per outcome), got shape "
                         f"{tuple(Y.shape)}; use Y.unsqueeze(-1) for a single outcome")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y: has {Y.shape[0]} rows but X has {X.shape[0]}; pass one row of outcomes per "
                         f"point")
    if m is not None and Y.shape[1] != m:
        raise ValueError(f"Y: the model was trained on m={m} outcomes, got {Y.shape[1]}; call fit() to "
                         f"start a model with other outcomes")
    if Y.shape[1] < 1:
        raise ValueError("Y: needs at least one outcome column")
    if not Y.is_floating_point() or not torch.isfinite(Y).all():
        raise ValueError("Y: every outcome must be a finite float; leave failed trials out of Y (or "
                         "model failure separately)")
    return X, Y


@runtime_checkable
class Surrogate(Protocol):
    """A model of the outcomes over encoded points, retrained as results stream in.

    ``X`` is always ``n x d`` in the unit cube, ``Y`` is ``n x m`` raw outcome
    values; ``fit`` starts from scratch, ``update`` is handed all the data so
    far and warm-starts from the current state; both return fit metrics.
    """

    def fit(self, X: torch.Tensor, Y: torch.Tensor) -> dict[str, Any]: ...

    def update(self, X: torch.Tensor, Y: torch.Tensor) -> dict[str, Any]: ...

    def predict(self, X: torch.Tensor, observation_noise: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @property
    def model(self) -> Model: ...

    def save(self, path: str | Path) -> None: ...

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Self: ...
