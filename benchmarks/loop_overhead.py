"""Measure the closed loop's own cost: Prefect start-up, and orchestration per trial.

Orchestration overhead is the wall time of a campaign minus the time spent in
the planner and in the instrument: ledger writes, the safety gate, Prefect
task submission and bookkeeping. It is measured with the random planner and a
zero-latency simulated instrument, so nearly all the time is the loop's own.

Usage (writes JSON and prints a Markdown table):
    .venv/bin/python benchmarks/loop_overhead.py --trials 100 --repeats 3 --out benchmarks/loop_overhead.json
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

CAMPAIGN = textwrap.dedent("""
    name: overhead
    seed: 0
    parameters:
      - {{name: x1, type: float, lower: -5, upper: 10}}
      - {{name: x2, type: float, lower: 0, upper: 15}}
    objectives: [{{name: y, goal: minimize}}]
    budget: {{max_trials: {trials}}}
    planner: {{name: random}}
    instruments: [{{name: reactor, simulator: branin, latency: 0.0, concurrency: {concurrency}}}]
""")


def _run(campaign: Path, out: Path, env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "labpilot"), "run", str(campaign), "--output", str(out),
                           "--quiet", "--fresh"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"labpilot run failed:\n{proc.stdout}\n{proc.stderr}")
    summary = json.loads((out / "summary.json").read_text())
    return {"process_seconds": wall, **summary["timing"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "loop_overhead.json")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
        env.pop("PREFECT_API_URL", None)
        for concurrency in (1, 4):
            campaign = tmp / f"c{concurrency}.yaml"
            campaign.write_text(CAMPAIGN.format(trials=args.trials, concurrency=concurrency))
            key = f"temporary_server_concurrency_{concurrency}"
            # The first run on a new PREFECT_HOME creates Prefect's database: a cold start.
            results[key] = [_run(campaign, tmp / "out", env) for _ in range(args.repeats)]
        # Against an already-running Prefect server (PREFECT_API_URL), as the test suite does.
        server = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent("""
                import sys, time
                from prefect.server.api.server import SubprocessASGIServer
                s = SubprocessASGIServer(); s.start(timeout=120); print(s.api_url, flush=True)
                sys.stdin.read(); s.stop()
            """)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().strip()
        try:
            env2 = {**env, "PREFECT_API_URL": url}
            campaign = tmp / "c1.yaml"
            results["existing_server_concurrency_1"] = [_run(campaign, tmp / "out", env2)
                                                         for _ in range(args.repeats)]
        finally:
            server.stdin.close()
            server.wait(timeout=60)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    report = {
        "command": f"benchmarks/loop_overhead.py --trials {args.trials} --repeats {args.repeats}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "trials": args.trials,
        "runs": results,
        "medians": {
            k: {
                "process_seconds": med(v, "process_seconds"),
                "prefect_ready_after_seconds": med(v, "prefect_ready_after_seconds"),
                "prefect_server_start_seconds": med(v, "prefect_server_start_seconds"),
                "campaign_seconds": med(v, "campaign_seconds"),
                "overhead_per_trial_ms": 1000 * med(v, "overhead_per_trial_seconds"),
                "campaign_ms_per_trial": 1000 * med(v, "campaign_seconds") / args.trials,
            }
            for k, v in results.items()
        },
    }
    args.out.write_text(json.dumps(report, indent=2))
    print("| setting | whole process (s) | Prefect API ready after (s) | campaign (s) | "
          "campaign per trial (ms) | orchestration per trial (ms) |")
    print("|---|---|---|---|---|---|")
    for k, m in report["medians"].items():
        print(f"| {k} | {m['process_seconds']:.1f} | {m['prefect_ready_after_seconds']:.1f} | "
              f"{m['campaign_seconds']:.1f} | {m['campaign_ms_per_trial']:.0f} | {m['overhead_per_trial_ms']:.0f} |")
    print("first run of each row's set is a cold Prefect start; per-run values are in the JSON")


if __name__ == "__main__":
    main()
