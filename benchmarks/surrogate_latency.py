"""Update latency: from a run's stop document to a new model version in use, through the stream.

A publisher (standing in for a station's RunEngine) sends each new run's documents
(start, descriptor, event, stop) over the loopback proxy; the trainer, fed by a stream
listener exactly as in ``labpilot run``, trains on the result; the clock stops when
``trainer.latest()`` (what the planner asks for) returns a version that includes it.
The trainer first catches up on ``--points`` noisy Hartmann6 results (as a resumed
campaign would from its ledger), so each measured update is at that size.

Usage:
    .venv/bin/python benchmarks/surrogate_latency.py --points 1000 --runs 20 --out benchmarks/surrogate_latency.json
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
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from botorch.test_functions import Hartmann  # noqa: E402

from orchestrator.stream import Listener, Proxy, Publisher, Subscriber, document_callback  # noqa: E402
from planners.base import Problem  # noqa: E402
from planners.space import FloatParameter, Objective, SearchSpace  # noqa: E402
from planners.surrogates.trainer import SurrogateTrainer  # noqa: E402

NAMES = [f"x{i}" for i in range(1, 7)]
PROBLEM = Problem(space=SearchSpace(parameters=[FloatParameter(name=n, lower=0, upper=1) for n in NAMES]),
                  objectives=[Objective(name="y", goal="minimize")])
F = Hartmann(dim=6)


def _result(gen: torch.Generator) -> tuple[dict[str, float], float]:
    x = torch.rand(6, generator=gen, dtype=torch.double)
    y = float(F(x.unsqueeze(0))) + 0.05 * float(torch.randn(1, generator=gen, dtype=torch.double))
    return dict(zip(NAMES, x.tolist(), strict=True)), y


def _documents(trial_id: int, point: dict[str, float], y: float) -> list[tuple[str, dict]]:
    run, desc, t = str(uuid.uuid4()), str(uuid.uuid4()), time.time()
    return [
        ("start", {"uid": run, "time": t, "trial_id": trial_id, "parameters": point,
                   "outcome_keys": {"y": "bench_y"}}),
        ("descriptor", {"uid": desc, "run_start": run, "time": t, "name": "primary", "data_keys": {}}),
        ("event", {"uid": str(uuid.uuid4()), "descriptor": desc, "time": t, "seq_num": 1,
                   "data": {"bench_y": y, **{f"bench_{k}": v for k, v in point.items()}}, "timestamps": {}}),
        ("stop", {"uid": str(uuid.uuid4()), "run_start": run, "time": time.time(), "exit_status": "success"}),
    ]


def measure(points: int, runs: int, switch_at: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp, Proxy() as proxy:
        trainer = SurrogateTrainer(PROBLEM, tmp, switch_at=switch_at, outcome_keys={"y": "bench_y"})
        trainer.catch_up([(i, *_as_outcomes(_result(gen))) for i in range(points)])
        t0 = time.perf_counter()
        first = trainer.update()
        first_fit = time.perf_counter() - t0
        pub = Publisher(proxy.publish_address, name="station")
        sub = Subscriber(proxy.subscribe_address, topics=("doc",))
        sub.wait_linked(pub)
        listener = Listener(sub, document_callback(trainer)).start()
        trainer.start()
        latencies, updates = [], []
        send = pub.document_callback("station")
        for r in range(runs):
            point, y = _result(gen)
            target = points + r + 1
            docs = _documents(points + r, point, y)
            for name, doc in docs[:-1]:
                send(name, doc)
            t_stop = time.perf_counter()
            send(*docs[-1])
            while True:
                v = trainer.latest()
                if v is not None and v.n_points >= target:
                    break
                if trainer.errors:
                    raise RuntimeError(trainer.errors[-1])
                time.sleep(0.0005)
            latencies.append(time.perf_counter() - t_stop)
            updates.append(v.metrics.get("update"))
            time.sleep(0.05)  # one result at a time, as a station delivers them
        listener.stop()
        trainer.stop()
        pub.close()
    return {"points": points, "runs": runs, "model": first.kind, "first_fit_seconds": first_fit,
            "latency_seconds": {"median": statistics.median(latencies), "max": max(latencies),
                                "p90": sorted(latencies)[int(0.9 * (len(latencies) - 1))],
                                "all": latencies},
            "updates": {u: updates.count(u) for u in set(updates)}}


def _as_outcomes(result: tuple[dict[str, float], float]) -> tuple[dict[str, float], dict[str, float]]:
    point, y = result
    return point, {"y": y}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, nargs="+", default=[1000])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=["gp", "ensemble"], choices=["gp", "ensemble"])
    ap.add_argument("--out", default="benchmarks/surrogate_latency.json")
    args = ap.parse_args()
    # the trainer's switch point decides the model: past it the ensemble, below it the exact GP
    results = [measure(n, args.runs, switch_at=n + args.runs + 1 if model == "gp" else n)
               for n in args.points for model in args.models]
    meta = {"command": " ".join([".venv/bin/python", *sys.argv]), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.is_available()}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    for r in results:
        lat = r["latency_seconds"]
        print(f"{r['points']} points ({r['model']}): stop document -> version in use, median {lat['median']:.3f} s, "
              f"p90 {lat['p90']:.3f} s, max {lat['max']:.3f} s; updates {r['updates']}")


if __name__ == "__main__":
    main()
