"""A bo proposal at 2,000 results, on a trained deep-ensemble version and on a trained GP version.

Noisy Hartmann6 (sd 0.05), one trainer update (the version), then three proposals
by ``bo`` on that version, timed; CPU unless a GPU is there.

Usage:
    .venv/bin/python benchmarks/proposal_at_2000.py --out benchmarks/proposal_at_2000.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from botorch.test_functions import Hartmann  # noqa: E402
from surrogate_latency import NAMES, PROBLEM  # noqa: E402

from orchestrator.learning import FixedModels  # noqa: E402
from planners import make_planner  # noqa: E402
from planners.base import HistoryItem  # noqa: E402
from planners.surrogates.trainer import SurrogateTrainer  # noqa: E402


def main(n: int = 2000, out: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, 6, generator=gen, dtype=torch.double)
    Y = Hartmann(dim=6)(X) + 0.05 * torch.randn(n, generator=gen, dtype=torch.double)
    history = [HistoryItem(dict(zip(NAMES, x.tolist(), strict=True)), "completed", {"y": float(y)})
               for x, y in zip(X, Y, strict=True)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, switch_at in (("ensemble", n // 2), ("gp", 2 * n)):
            trainer = SurrogateTrainer(PROBLEM, tmp, switch_at=switch_at)
            trainer.catch_up([(i, h.parameters, h.outcomes) for i, h in enumerate(history)])
            t0 = time.perf_counter()
            version = trainer.update()
            fit = time.perf_counter() - t0
            planner = make_planner("bo", PROBLEM, seed=0)
            planner.surrogate_source = FixedModels(version)
            times = []
            for r in range(3):
                t0 = time.perf_counter()
                planner.ask(1, history[: n - r], [])
                times.append(time.perf_counter() - t0)
            print(f"{kind}: {version.label} trained in {fit:.1f} s; proposal at {n} results: median "
                  f"{statistics.median(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)})")
            rows.append({"model": kind, "version": version.label, "train_seconds": fit,
                         "proposal_seconds": {"median": statistics.median(times), "all": times}})
    if out:
        meta = {"command": " ".join(["benchmarks/proposal_at_2000.py", *sys.argv[1:]]), "results": n,
                "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.is_available(), "python": platform.python_version()}
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=int, default=2000)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    main(args.results, args.out)
