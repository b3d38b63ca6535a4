"""Seconds from Ctrl-C (SIGINT to the whole process group, as a terminal sends it) to the exit of
`labpilot run`, mid-trial, with Prefect's temporary server (no PREFECT_API_URL).

    python benchmarks/ctrl_c.py --repeats 3 --out benchmarks/ctrl_c.json

On main before the fix the same Ctrl-C also reached the server child, which died, and the
campaign retried the dead API for 74-98 s before it exited 1 without the resume hint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CAMPAIGN = """
name: ctrl-c
seed: 1
parameters:
  - {name: x1, type: float, lower: -5, upper: 10}
  - {name: x2, type: float, lower: 0, upper: 15}
objectives: [{name: y, goal: minimize}]
budget: {max_trials: 5}
planner: {name: sobol}
instruments: [{name: reactor, simulator: branin, latency: 3}]
"""


def once(directory: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    (directory / "c.yaml").write_text(CAMPAIGN)
    out = directory / "run"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(directory / "c.yaml"),
                             "--output", str(out), "--quiet"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            with sqlite3.connect(f"file:{out}/ledger.sqlite?mode=ro", uri=True) as db:
                if db.execute("SELECT count(*) FROM trials WHERE state = 'running'").fetchone()[0]:
                    break
        except sqlite3.Error:
            pass
    time.sleep(0.5)  # mid-trial
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return {"seconds": time.monotonic() - t0, "exit_code": proc.returncode,
            "resume_hint": "to resume" in err, "traceback": "Traceback" in err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/ctrl_c.json")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(once(Path(tmp)))
            print(runs[-1], flush=True)
    result = {"command": "python benchmarks/ctrl_c.py " + " ".join(sys.argv[1:]),
              "median_seconds": statistics.median(r["seconds"] for r in runs),
              "before_fix_seconds": "74-98 (issue 9, seen on main)", "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
