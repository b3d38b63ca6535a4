"""10,000 random and adversarial points (tests/test_safety.py's strategies) against the safety gate:
how many pass while outside the envelope or of the wrong type, and how many make the gate raise.

    python benchmarks/gate_attack.py [--old PATH/TO/old/orchestrator/safety.py] --out benchmarks/gate_attack.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(veto_reason, points) -> dict:  # noqa: ANN001
    from tests.test_safety import SAFETY, SPACE, legal_by_hand

    passed_outside = raised = passed = 0
    for point in points:
        try:
            why = veto_reason(point, SPACE, SAFETY)
        except Exception:  # noqa: BLE001
            raised += 1
            continue
        if why is None:
            passed += 1
            passed_outside += not legal_by_hand(point)  # what would reach the device: the point as given
    return {"points": len(points), "passed": passed, "passed_outside_or_wrong_type": passed_outside,
            "raised": raised}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", help="an earlier orchestrator/safety.py to measure beside this one")
    parser.add_argument("--out", default="benchmarks/gate_attack.json")
    args = parser.parse_args()
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from orchestrator.safety import check_point
    from tests.test_safety import points as point_strategy

    points: list = []

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(point_strategy(), min_size=100, max_size=100))
    def collect(batch) -> None:  # noqa: ANN001
        points.extend(batch)

    collect()
    points = points[:10_000]

    def new(point, space, safety):  # noqa: ANN001, ANN202 - what the gate sends, as the device gets it
        sent, why = check_point(point, space, safety)
        if why is None:
            point.clear()
            point.update(sent)
        return why

    result = {"command": "python benchmarks/gate_attack.py " + " ".join(sys.argv[1:]),
              "after": measure(new, [dict(p) for p in points])}
    if args.old:
        spec = importlib.util.spec_from_file_location("old_safety", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        result["before"] = measure(old.veto_reason, [dict(p) for p in points])
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
