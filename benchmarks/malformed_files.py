"""The malformed campaign files of tests/test_malformed_files.py through ``validate``: how many
pass, how many are refused without naming the field, how many are refused naming it, and how
many crash the loader. Run from a checkout with PYTHONPATH set to it:

    PYTHONPATH=. python benchmarks/malformed_files.py --label after --out benchmarks/malformed_files.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
from pathlib import Path


def _one(text: str, field: str, queue) -> None:  # noqa: ANN001 - in a child: a bomb cannot take the harness down
    from orchestrator.spec import CampaignError, load_campaign

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "campaign.yaml"
        path.write_text(text)
        try:
            load_campaign(path)
        except CampaignError as exc:
            queue.put("refused, field named" if any(field in i.path for i in exc.issues) else "refused, field not named")
        except BaseException as exc:  # noqa: BLE001
            queue.put(f"crashed: {type(exc).__name__}")
        else:
            queue.put("passed validate")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", default="benchmarks/malformed_files.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_malformed_files import MALFORMED

    outcomes = {}
    for what, text, field in MALFORMED:
        queue = multiprocessing.Queue()
        child = multiprocessing.Process(target=_one, args=(text, field, queue))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
            outcomes[what] = "hung (killed after 60 s)"
        else:
            outcomes[what] = queue.get() if not queue.empty() else f"crashed: exit {child.exitcode}"
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o] = counts.get(o, 0) + 1
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result[args.label] = {"files": len(MALFORMED), "counts": counts, "each": outcomes}
    out.write_text(json.dumps(result, indent=2))
    print(args.label, counts)


if __name__ == "__main__":
    main()
