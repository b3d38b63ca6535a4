"""Calibration as it runs: a 200-trial BO campaign on a noisy test function, each result checked
against the newest model's prediction for it before the model is trained on it.

The loop is the campaign's own, without instruments or Prefect (which do not change
what the model sees): ``bo`` asks with the trainer as its surrogate source, the
result is measured with Gaussian noise, the trainer checks it against the newest
version (the 68 % and 95 % predictive intervals, the Gaussian NLL) and trains on it.
Reported: coverage over the whole campaign (every check, not only the rolling
window) and per quarter of the campaign, the mean NLL, and how often the planner
was told to widen its intervals.

Usage:
    .venv/bin/python benchmarks/calibration.py --problem hartmann6 --noise 0.1 --trials 200 --seeds 3 --out benchmarks/calibration.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from orchestrator.bench import parse_problem  # noqa: E402
from planners import make_planner  # noqa: E402
from planners.base import HistoryItem  # noqa: E402
from planners.surrogates import CalibrationTracker  # noqa: E402
from planners.surrogates.trainer import SurrogateTrainer  # noqa: E402


class CheckedTracker(CalibrationTracker):
    """The trainer's tracker, also keeping each check's standardised residual ``z`` (of the first
    outcome observed), for the coverage by quarter of the campaign and the median ``|z|``."""

    def __init__(self) -> None:
        super().__init__()
        self.zs: list[float] = []

    def record(self, mean, sd, observed) -> None:  # noqa: ANN001
        super().record(mean, sd, observed)  # raises, recording nothing, for a check it refuses
        name = next(iter(observed))
        self.zs.append((float(observed[name]) - float(mean[name])) / float(sd[name]))


def campaign(problem: str, noise: float, trials: int, seed: int) -> dict:
    bp = parse_problem(problem)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SurrogateTrainer(bp.problem, tmp, min_points=5)
        trainer.calibration = checks = CheckedTracker()
        planner = make_planner("bo", bp.problem, seed=seed)
        planner.surrogate_source = trainer
        history: list[HistoryItem] = []
        widened, t0 = 0, time.perf_counter()
        for t in range(trials):
            proposal = planner.ask(1, history, [])[0]
            widened += "x" in (proposal.model_version or "").split("-v")[-1]
            truth = bp.sim.evaluate(proposal.parameters)
            seen = {k: float(v) + noise * float(rng.normal()) for k, v in truth.items()}
            trainer.add_result(t, proposal.parameters, seen)
            trainer.update()
            history.append(HistoryItem(proposal.parameters, "completed", seen))
        seconds = time.perf_counter() - t0
    zs = checks.zs
    quarters = []
    for q in range(4):
        part = zs[q * len(zs) // 4: (q + 1) * len(zs) // 4]
        quarters.append(sum(abs(z) <= 1.96 for z in part) / len(part) if part else None)
    s = checks.totals()["overall"]  # every check of the campaign, not only the rolling window
    return {"seed": seed, "checks": s["count"], "coverage_68": s["coverage_68"], "coverage_95": s["coverage_95"],
            "nll_model_units": s["nll"], "coverage_95_by_quarter": quarters,
            "proposals_with_widened_intervals": widened, "seconds": seconds,
            "z_abs_median": statistics.median(abs(z) for z in zs) if zs else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problem", default="hartmann6")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--out", default="benchmarks/calibration.json")
    args = ap.parse_args()
    runs = [campaign(args.problem, args.noise, args.trials, s) for s in range(args.first_seed, args.first_seed + args.seeds)]
    meta = {"command": " ".join([".venv/bin/python", *sys.argv]), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    med = statistics.median(r["coverage_95"] for r in runs)
    Path(args.out).write_text(json.dumps({"meta": meta, "median_coverage_95": med, "runs": runs}, indent=1))
    for r in runs:
        print(f"seed {r['seed']}: {r['checks']} checks, 95% coverage {r['coverage_95']:.3f} "
              f"(by quarter {[None if q is None else round(q, 3) for q in r['coverage_95_by_quarter']]}), "
              f"68% {r['coverage_68']:.3f}, NLL {r['nll_model_units']:.3f}, widened "
              f"{r['proposals_with_widened_intervals']}, {r['seconds']:.0f} s")
    print(f"median 95% coverage {med:.3f} (target 0.90-0.99): {'met' if 0.90 <= med <= 0.99 else 'NOT met'}"
          if not math.isnan(med) else "no checks")


if __name__ == "__main__":
    main()
