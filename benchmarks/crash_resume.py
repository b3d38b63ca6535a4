"""SIGKILLs of a campaign's process group at random moments, resumed each time, against a reactor
that journals every run and measurement before acting (tests/journal_device.py): results lost,
points run twice, runs against the budget.

    python benchmarks/crash_resume.py --campaigns 3 --kills 9 --trials 40 --out benchmarks/crash_resume.json

The same harness as tests/test_crash_resume.py, at the issue's size (27 kills over three 40-trial
campaigns). Run it from a checkout of the code to measure (``--label`` names it in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaigns", type=int, default=3)
    parser.add_argument("--kills", type=int, default=9)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--planner", default="sobol")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", default="benchmarks/crash_resume.json")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.server.api.server import SubprocessASGIServer

    from tests.test_crash_resume import crash_and_resume

    server = SubprocessASGIServer()
    server.start(timeout=120)
    env = {**os.environ, "PREFECT_API_URL": server.api_url, "LABPILOT_TEST_LATENCY": "0.3"}
    runs = []
    try:
        for c in range(args.campaigns):
            with tempfile.TemporaryDirectory() as tmp:
                r = crash_and_resume(Path(tmp), args.kills, args.trials, seed=c + 1, planner=args.planner, env=env,
                                     rng=random.Random(100 + c), window=(2.0, 9.0))
                r.pop("stderr")
                runs.append(r)
                print(r, flush=True)
    finally:
        server.stop()
    total = {k: sum(r[k] for r in runs) for k in ("kills", "device_runs", "budget", "repeats", "lost",
                                                   "lost_recorded", "not_final")}
    result = {"label": args.label, "command": "python benchmarks/crash_resume.py " + " ".join(sys.argv[1:]),
              "total": total, "runs": runs}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous[args.label] = result
    out.write_text(json.dumps(previous, indent=2))
    print(json.dumps(total))


if __name__ == "__main__":
    main()
