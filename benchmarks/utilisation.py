"""Several instruments at once: how busy the loop keeps them, and what it costs in quality.

Four stations whose trials take a time drawn uniformly from 0.5 to 2 s, run by
``labpilot run`` as a user would: in-process simulated instruments
(``concurrency: 4``), and four caproto IOCs over Channel Access on loopback
(four ``kind: epics`` instruments, each its own IOC process and port). For each
run the ledger says when every trial started and finished on which station:

* utilisation of a station = the time it ran trials / the campaign's span (first
  start to last finish); the figure is the mean over the stations;
* idle gap = from a station's trial finishing to its next trial starting (the
  loop's reaction: recording, asking the planner, the gate, submission).

Quality: the best value after the same number of trials, on the same seeds, with
one station and with four (the one-station runs have no latency: the planner sees
the same results in the same order whatever the clock says, so only the
four-station runs pay the wall time).

Usage (writes JSON and a Markdown table beside it):
    .venv/bin/python benchmarks/utilisation.py --trials 200 --seeds 0 1 2 --planner sobol \
        --out benchmarks/utilisation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instruments.epics_env import LOOPBACK_ENV  # noqa: E402

PROBLEM_PARAMS = {
    "branin": [("x1", -5, 10), ("x2", 0, 15)],
    "hartmann6": [(f"x{i}", 0, 1) for i in range(1, 7)],
}
OPTIMUM = {"branin": 0.397887, "hartmann6": -3.32237}

HEAD = """\
name: util-{tag}
seed: {seed}
parameters:
{params}
objectives: [{{name: y, goal: minimize}}]
budget: {{max_trials: {trials}, max_consecutive_failures: 10}}
planner: {{name: {planner}}}
"""


def _params(problem: str) -> str:
    return "\n".join(f"  - {{name: {n}, type: float, lower: {lo}, upper: {hi}}}" for n, lo, hi in PROBLEM_PARAMS[problem])


def campaign_inprocess(problem: str, planner: str, seed: int, trials: int, stations: int,
                       latency: str) -> str:
    return HEAD.format(tag=f"inproc{stations}", seed=seed, params=_params(problem), trials=trials,
                       planner=planner) + textwrap.dedent(f"""\
        instruments:
          - {{name: station, simulator: {problem}, latency: {latency}, concurrency: {stations}, timeout: 30}}
        """)


def campaign_iocs(problem: str, planner: str, seed: int, trials: int, prefixes: list[str]) -> str:
    text = HEAD.format(tag="iocs", seed=seed, params=_params(problem), trials=trials, planner=planner)
    text += "instruments:\n"
    names = [n for n, _, _ in PROBLEM_PARAMS[problem]]
    for i, prefix in enumerate(prefixes):
        moves = "\n".join(f"          {n}: {{setpoint: {n}, put_complete: true}}" for n in names)
        text += textwrap.indent(textwrap.dedent(f"""\
            - name: ioc{i + 1}
              kind: epics
              timeout: 30
              epics:
                prefix: '{prefix}'
                parameters:
            """), "  ") + moves + "\n" + textwrap.indent(textwrap.dedent("""\
                trigger: {pv: ACQUIRE, error: ERROR}
                counter: COUNT
                results: {y: {pv: y}}
                timeout: 10
                connection_timeout: 30
            """), "      ")
    return text


def measure(out: Path) -> dict:
    """Utilisation, idle gaps and the best value, from the run's ledger."""
    from orchestrator.ledger import Ledger

    ledger = Ledger.for_directory(out)
    try:
        campaign = ledger.campaigns()[0]
        trials = [t for t in ledger.trials(campaign.id) if t.started_at and t.finished_at]
        by_station: dict[str, list] = {}
        for t in trials:
            by_station.setdefault(t.instrument, []).append(t)
        start = min(t.started_at for t in trials)
        end = max(t.finished_at for t in trials)
        span = (end - start).total_seconds()
        per_station, gaps = {}, []
        for station, ts in sorted(by_station.items()):
            ts.sort(key=lambda t: t.started_at)
            busy = sum((t.finished_at - t.started_at).total_seconds() for t in ts)
            per_station[station] = round(busy / span, 4)
            gaps += [(b.started_at - a.finished_at).total_seconds() for a, b in zip(ts, ts[1:], strict=False)]
        history = ledger.history(campaign.id)
        values = [h.outcomes["y"] for h in history if h.state == "completed" and "y" in h.outcomes]
        counts = ledger.counts(campaign.id)
        return {"utilisation": round(statistics.mean(per_station.values()), 4) if per_station else 0.0,
                "per_station": per_station, "span_seconds": round(span, 2),
                "idle_gap_median_s": round(statistics.median(gaps), 4) if gaps else None,
                "idle_gap_p95_s": round(sorted(gaps)[int(0.95 * (len(gaps) - 1))], 4) if gaps else None,
                "trial_seconds_median": round(statistics.median(
                    (t.finished_at - t.started_at).total_seconds() for t in trials), 4),
                "best": min(values) if values else None, "completed": counts.get("completed", 0),
                "failed": counts.get("failed", 0)}
    finally:
        ledger.close()


def run(campaign_text: str, out: Path, env: dict[str, str]) -> dict:
    path = out.with_suffix(".yaml")
    path.write_text(campaign_text)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--output", str(out),
                           "--quiet", "--fresh"], env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"labpilot run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"process_seconds": round(wall, 2), **measure(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--planner", default="sobol")
    ap.add_argument("--problem", default="branin", choices=sorted(PROBLEM_PARAMS))
    ap.add_argument("--modes", nargs="+", default=["inprocess", "iocs", "single"],
                    choices=["inprocess", "iocs", "single"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "utilisation.json")
    args = ap.parse_args()

    from simulators.ioc import free_port, start_ioc

    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), **LOOPBACK_ENV,
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
               "PYTHONPATH": str(ROOT)}
        iocs = []
        if "iocs" in args.modes:
            ports = [free_port() for _ in range(4)]
            env["EPICS_CA_ADDR_LIST"] = " ".join(f"127.0.0.1:{p}" for p in ports)
            os.environ.update(LOOPBACK_ENV)
            iocs = [start_ioc(args.problem, f"u{i + 1}:", port, extra=["--latency", "0.5:2.0",
                                                                        "--seed", str(i)])
                    for i, port in enumerate(ports)]
        try:
            for seed in args.seeds:
                for mode in args.modes:
                    if mode == "inprocess":
                        text = campaign_inprocess(args.problem, args.planner, seed, args.trials, 4, "[0.5, 2.0]")
                    elif mode == "single":
                        text = campaign_inprocess(args.problem, args.planner, seed, args.trials, 1, "0.0")
                    else:
                        text = campaign_iocs(args.problem, args.planner, seed, args.trials,
                                             [h.prefix for h in iocs])
                    r = run(text, tmp / f"{mode}-{seed}", env)
                    r["seed"] = seed
                    results[mode].append(r)
                    print(mode, seed, {k: r[k] for k in ("utilisation", "idle_gap_median_s", "best",
                                                         "span_seconds")}, flush=True)
        finally:
            for h in iocs:
                h.stop()

    summary = {}
    for mode, rs in results.items():
        summary[mode] = {"utilisation_median": statistics.median(r["utilisation"] for r in rs),
                         "utilisation_min": min(r["utilisation"] for r in rs),
                         "idle_gap_median_s": statistics.median(r["idle_gap_median_s"] or 0 for r in rs),
                         "best_median": statistics.median(r["best"] for r in rs)}
    paired = {}
    if "single" in results:
        single = {r["seed"]: r["best"] for r in results["single"]}
        for mode in ("inprocess", "iocs"):
            if mode in results:
                regret = [(r["best"] - OPTIMUM[args.problem], single[r["seed"]] - OPTIMUM[args.problem])
                          for r in results[mode]]
                paired[mode] = {"regret_4_vs_1": regret,
                                "seeds_no_worse": sum(a <= b + 1e-9 for a, b in regret),
                                "median_regret_4": statistics.median(a for a, _ in regret),
                                "median_regret_1": statistics.median(b for _, b in regret)}
    doc = {"command": " ".join(["benchmarks/utilisation.py"] + sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
           "problem": args.problem, "planner": args.planner, "trials": args.trials, "seeds": args.seeds,
           "trial_seconds": [0.5, 2.0], "summary": summary, "quality": paired, "runs": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Utilisation: 4 stations, trials of 0.5-2 s, {args.planner} on {args.problem}, "
             f"{args.trials} trials, seeds {args.seeds}", "",
             f"`{doc['command']}` on {os.cpu_count()} CPUs", "",
             "| mode | utilisation (median, min) | idle gap median (s) | best (median) |", "|---|---|---|---|"]
    for mode, s in summary.items():
        lines.append(f"| {mode} | {s['utilisation_median']:.3f}, {s['utilisation_min']:.3f} | "
                     f"{s['idle_gap_median_s']:.3f} | {s['best_median']:.5g} |")
    for mode, q in paired.items():
        lines += ["", f"{mode} vs one station (paired seeds): no worse on {q['seeds_no_worse']} of "
                      f"{len(q['regret_4_vs_1'])}; median regret {q['median_regret_4']:.4g} (4) vs "
                      f"{q['median_regret_1']:.4g} (1)"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
