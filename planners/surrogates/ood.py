"""How far a point is from the data a surrogate was trained on, in units of the data's own spacing."""

from __future__ import annotations

import math

import torch

from planners.surrogates.base import check_points

_CHUNK = 2048


def _nearest_distance(A: torch.Tensor, B: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Euclidean distance from each row of ``A: a x d`` to its nearest row of ``B: b x d`` -> ``a``.

    With ``exclude_self`` (``A`` is ``B``), a row's distance to itself is not counted.
    """
    out = []
    for start in range(0, A.shape[0], _CHUNK):
        dist = torch.cdist(A[start:start + _CHUNK], B)
        if exclude_self:
            rows = torch.arange(dist.shape[0], device=dist.device)
            dist[rows, rows + start] = math.inf
        out.append(dist.min(dim=-1).values)
    return torch.cat(out)


def ood_score(X_train: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Out-of-domain score of each point: nearest-training-point distance over the training data's spacing.

    ``score[i] = min_j ||X[i] - X_train[j]|| / s`` for ``X_train: n x d`` and
    ``X: b x d`` (encoded points in the unit cube), returning ``b`` scores
    (double, on ``X``'s device), where ``s`` is the median over training points
    of the distance to their nearest *other* training point. So a training
    point scores 0, a point about as far from the data as the data's points are
    from each other scores about 1, and a point far outside the data scores
    much more. Repeated training points (replicates) are counted once when
    measuring ``s``. With a single distinct training point there is no spacing
    to measure; ``s`` is then ``sqrt(d / 6)``, the root-mean-square distance
    between two uniform random points of the unit cube.
    """
    X_train = check_points(X_train, "X_train")
    X = check_points(X, "X", d=X_train.shape[-1])
    Xt = X_train.to(X.device, torch.double)
    Xq = X.to(torch.double)
    distinct = torch.unique(Xt, dim=0)
    if distinct.shape[0] >= 2:
        spacing = float(_nearest_distance(distinct, distinct, exclude_self=True).median())
    else:
        spacing = math.sqrt(Xt.shape[-1] / 6.0)
    return _nearest_distance(Xq, Xt) / spacing


__all__ = ["ood_score"]
