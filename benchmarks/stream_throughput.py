"""Stream throughput on loopback: documents per second from one publisher through the proxy to
subscribers, each in its own process, with every loss counted (sequence numbers).

Two settings (issue 4): as fast as one publisher can go to one subscriber, and a steady
10,000 documents per second to three subscribers. The documents are event documents of
the size our simulated instruments emit (three readings with timestamps).

Usage:
    .venv/bin/python benchmarks/stream_throughput.py --out benchmarks/stream_throughput.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.stream import Proxy, Publisher, Subscriber  # noqa: E402


def _event(i: int) -> dict:
    t = time.time()
    return {"uid": f"{i:036d}", "descriptor": "d" * 36, "seq_num": i, "time": t,
            "data": {"x1": 0.1 * i, "x2": 0.2 * i, "y": 0.3 * i},
            "timestamps": {"x1": t, "x2": t, "y": t}, "filled": {}}


def _subscriber(address: str, n: int, ready, out) -> None:
    sub = Subscriber(address, topics=("doc",), from_start=True)
    ready.set()
    got, first, last = 0, None, None
    while True:
        msg = sub.recv(timeout=10)
        if msg is None:
            break
        if msg.body.get("name") == "end":
            last = time.perf_counter()
            break
        if first is None:
            first = time.perf_counter()
        got += 1
    out.put({"received": got, "missing": sum(g.missing for g in sub.gaps), "gaps": len(sub.gaps),
             "first": first, "last": last})


def _publisher(address: str, n: int, rate: float | None, go, done) -> None:
    pub = Publisher(address, name="bench-publisher")
    go.wait()
    docs = [_event(i) for i in range(1000)]
    t0 = time.perf_counter()
    send = pub.document_callback("bench")
    for i in range(n):
        if rate is not None and i % 100 == 0:
            ahead = i / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
        send("event", docs[i % 1000])
    t1 = time.perf_counter()
    time.sleep(0.5)  # let the tail through before the end marker
    send("end", {})
    done.put({"sent": n, "publish_seconds": t1 - t0})
    time.sleep(0.5)
    pub.close()


def run(n: int, subscribers: int, rate: float | None) -> dict:
    ctx = mp.get_context("spawn")
    with Proxy() as proxy:
        readies = [ctx.Event() for _ in range(subscribers)]
        out, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        subs = [ctx.Process(target=_subscriber, args=(proxy.subscribe_address, n, r, out)) for r in readies]
        for p in subs:
            p.start()
        for r in readies:
            r.wait(30)
        pub = ctx.Process(target=_publisher, args=(proxy.publish_address, n, rate, go, done))
        pub.start()
        # ZeroMQ's slow joiner: subscriptions must travel to the publisher before it sends. A second
        # is ample on loopback; anything lost at the start would show as missing (from_start).
        time.sleep(1.0)
        go.set()
        sent = done.get(timeout=600)
        results = [out.get(timeout=600) for _ in subs]
        pub.join(10)
        for p in subs:
            p.join(10)
    per_sub = []
    for r in results:
        span = (r["last"] - r["first"]) if r["first"] and r["last"] else None
        per_sub.append({**r, "docs_per_second": (r["received"] / span) if span else None})
    return {"documents": n, "subscribers": subscribers, "target_rate": rate,
            "publish_docs_per_second": n / sent["publish_seconds"],
            "lost": sum(r["missing"] + (n - r["received"] - r["missing"]) for r in results),
            "per_subscriber": per_sub}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--documents", type=int, default=300_000)
    ap.add_argument("--steady-documents", type=int, default=50_000, help="at 10,000 per second")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/stream_throughput.json")
    args = ap.parse_args()
    fast = [run(args.documents, 1, None) for _ in range(args.repeats)]
    steady = [run(args.steady_documents, 3, 10_000.0) for _ in range(args.repeats)]
    summary = {
        "one_subscriber_as_fast_as_possible": {
            "median_docs_per_second_received": statistics.median(
                r["per_subscriber"][0]["docs_per_second"] for r in fast),
            "median_docs_per_second_published": statistics.median(r["publish_docs_per_second"] for r in fast),
            "lost": [r["lost"] for r in fast]},
        "three_subscribers_at_10000_per_second": {
            "median_docs_per_second_published": statistics.median(r["publish_docs_per_second"] for r in steady),
            "lost": [r["lost"] for r in steady]},
    }
    meta = {"command": " ".join([".venv/bin/python", *sys.argv]), "cpus": os.cpu_count(),
            "python": platform.python_version(), "machine": platform.machine()}
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "fast": fast, "steady": steady},
                                         indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
