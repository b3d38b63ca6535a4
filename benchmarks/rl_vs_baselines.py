"""Compare the reinforcement-learning planner with random, Sobol and BO on Branin and Hartmann6.

Each planner runs one sequential campaign (one trial at a time, no pending points)
per seed on each problem; the table gives, over seeds, the median best value
found, the median simple regret (best found minus the known optimum) at three
budgets, how many seeds beat random search with the same seed, and the wall
time of an ask once a model is in use (after the 5 initial Sobol trials of rl
and bo; every ask for random and Sobol).

Usage (prints Markdown tables; about 10-15 minutes on a 2-core machine):
    .venv/bin/python benchmarks/rl_vs_baselines.py --seeds 5 --branin-trials 30 --hartmann-trials 35
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from planners import HistoryItem, Problem, make_planner  # noqa: E402
from planners.bo import torch_device  # noqa: E402
from planners.space import SearchSpace  # noqa: E402
from simulators import load_problem  # noqa: E402

INITIAL = 5  # initial Sobol trials of bo and rl (their default)


def campaign(problem_name: str, planner_name: str, seed: int, trials: int,
             options: dict | None) -> tuple[list[float], list[float]]:
    """Best-so-far after each trial, and the seconds each ask took."""
    sim = load_problem(problem_name)
    problem = Problem(space=SearchSpace(parameters=sim.parameters), objectives=sim.objectives)
    planner = make_planner(planner_name, problem, seed=seed, options=options)
    (objective,) = sim.objectives
    sign = 1.0 if objective.goal == "minimize" else -1.0
    history: list[HistoryItem] = []
    best, trace, times = math.inf, [], []
    for _ in range(trials):
        t0 = time.perf_counter()
        proposal = planner.ask(1, history, [])[0]
        times.append(time.perf_counter() - t0)
        outcomes = sim.evaluate(proposal.parameters)
        history.append(HistoryItem(proposal.parameters, "completed", outcomes))
        best = min(best, sign * outcomes[objective.name])
        trace.append(sign * best)
    return trace, times


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--branin-trials", type=int, default=30)
    ap.add_argument("--hartmann-trials", type=int, default=35)
    ap.add_argument("--planners", default="rl,bo,random,sobol")
    ap.add_argument("--rl-options", default="{}", help="JSON options for the rl planner")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every planner (default 1: fastest for these small "
                         "problems on a shared machine; 0 leaves torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    planners = [p.strip() for p in args.planners.split(",") if p.strip()]
    rl_options = json.loads(args.rl_options) or None
    seeds = list(range(args.seeds))
    print(f"# rl vs baselines: seeds {seeds[0]}..{seeds[-1]}, torch {torch.__version__}, "
          f"device {torch_device()}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    if rl_options:
        print(f"rl options: {rl_options}")
    started = time.perf_counter()
    for problem_name, trials in (("branin", args.branin_trials), ("hartmann6", args.hartmann_trials)):
        optimum = load_problem(problem_name).optimum["y"]
        budgets = sorted({max(1, trials // 3), max(1, 2 * trials // 3), trials})
        traces: dict[str, list[list[float]]] = {}
        ask_times: dict[str, list[float]] = {}
        for name in planners:
            traces[name], ask_times[name] = [], []
            for seed in seeds:
                trace, times = campaign(problem_name, name, seed, trials,
                                        rl_options if name == "rl" else None)
                traces[name].append(trace)
                modelled = times[INITIAL:] if name in ("rl", "bo") else times
                ask_times[name].extend(modelled)
                print(f"  {problem_name} {name} seed {seed}: best {trace[-1]:.4f} "
                      f"({statistics.mean(modelled):.2f} s/ask)", file=sys.stderr, flush=True)
        print(f"\n## {problem_name} (minimise; optimum {optimum}), {trials} trials, {len(seeds)} seeds\n")
        head = " | ".join(f"median regret @{b}" for b in budgets)
        print(f"| planner | median best | {head} | regret IQR @{trials} | seeds beating random "
              f"| s/ask mean (max) |")
        print("|---|---|" + "---|" * len(budgets) + "---|---|---|")
        for name in planners:
            finals = [t[-1] for t in traces[name]]
            regrets = [[t[b - 1] - optimum for t in traces[name]] for b in budgets]
            lo, hi = quartiles([f - optimum for f in finals])
            if "random" in traces and name != "random":
                wins = sum(a < r[-1] for a, r in zip(finals, traces["random"], strict=True))
                beat = f"{wins}/{len(seeds)}"
            else:
                beat = "-"
            t = ask_times[name]
            cells = " | ".join(f"{statistics.median(r):.4f}" for r in regrets)
            print(f"| {name} | {statistics.median(finals):.4f} | {cells} | {lo:.3f}-{hi:.3f} | {beat} "
                  f"| {statistics.mean(t):.2f} ({max(t):.2f}) |")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
