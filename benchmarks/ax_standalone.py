"""Ax's ``Client`` on Hartmann6 exactly as Ax's documentation runs it, with no labpilot code in the loop.

The reference for the bench's ``ax-native`` row: one ``Client(random_seed=seed)``,
``configure_experiment`` / ``configure_optimization``, then ``get_next_trials`` /
``complete_trial`` until the budget is spent; Hartmann6 written out in numpy
(Hartmann 1972 constants, minimum -3.32237), or with ``--function botorch``
BoTorch's ``Hartmann(dim=6)``, the bench's function, whose constants are float32
(its values differ from the numpy ones by about 1e-8).

Usage:
    .venv/bin/python benchmarks/ax_standalone.py --seeds 0 1 2 3 4 --trials 35 --out benchmarks/planners/ax_standalone_hartmann6.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8],
              [17, 8, 0.05, 10, 0.1, 14]])
P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                     [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])
ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
OPTIMUM = -3.32237


def hartmann6(x: list[float]) -> float:
    """Hartmann6 at ``x`` (6 numbers in [0, 1])."""
    return float(-(ALPHA * np.exp(-(A * (np.asarray(x) - P) ** 2).sum(1))).sum())


def botorch_hartmann6(x: list[float]) -> float:
    """BoTorch's Hartmann6, as the bench's ``hartmann6`` evaluates it."""
    import torch
    from botorch.test_functions import Hartmann

    with torch.no_grad():
        return float(Hartmann(dim=6).evaluate_true(torch.tensor([x], dtype=torch.double)).reshape(-1)[0])


def run(seed: int, trials: int, f=hartmann6) -> dict:
    """One Ax run of ``trials`` trials of ``f``; its best value, regret and trace."""
    from ax.api.client import Client
    from ax.api.configs import RangeParameterConfig

    client = Client(random_seed=seed)
    client.configure_experiment(parameters=[
        RangeParameterConfig(name=f"x{i}", parameter_type="float", bounds=(0.0, 1.0)) for i in range(1, 7)])
    client.configure_optimization(objective="-y")
    best, trace, t0 = np.inf, [], time.perf_counter()
    while len(trace) < trials:
        for index, params in client.get_next_trials(max_trials=1).items():
            y = f([params[f"x{i}"] for i in range(1, 7)])
            client.complete_trial(trial_index=index, raw_data={"y": y})
            best = min(best, y)
            trace.append(best)
    return {"seed": seed, "best_value": best, "simple_regret": best - OPTIMUM, "best_so_far": trace,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--trials", type=int, default=35)
    ap.add_argument("--function", choices=("numpy", "botorch"), default="numpy")
    ap.add_argument("--out", default="benchmarks/planners/ax_standalone_hartmann6.json")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # Ax logs a line per call
    import ax

    runs = []
    for seed in args.seeds:
        runs.append(run(seed, args.trials, hartmann6 if args.function == "numpy" else botorch_hartmann6))
        print(f"seed {seed}: regret {runs[-1]['simple_regret']:.4g} ({runs[-1]['seconds']:.0f} s)", flush=True)
    regrets = [r["simple_regret"] for r in runs]
    meta = {"command": "benchmarks/ax_standalone.py " + " ".join(
        ["--seeds", *map(str, args.seeds), "--trials", str(args.trials), "--function", args.function,
         "--out", args.out]),
        "ax": ax.__version__, "python": platform.python_version()}
    Path(args.out).write_text(json.dumps({"meta": meta, "simple_regret": {
        "median": statistics.median(regrets), "per_seed": regrets}, "runs": runs}, indent=1))
    print(f"median regret {statistics.median(regrets):.4g}; wrote {args.out}")


if __name__ == "__main__":
    main()
