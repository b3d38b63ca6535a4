"""Before/after figures for the stream hardening: a forged publisher sends bad frames, a 50 MB frame, a forged sequence number and forged runs (issue 10). Run from a checkout with PYTHONPATH set to it:

    PYTHONPATH=. python benchmarks/stream_attack.py [bad] [seq] [run]

benchmarks/stream_attack.md holds its output on main before the fix (f430131) and after.
"""

import struct
import sys
import tempfile
import time

import msgpack
import numpy as np

from orchestrator.learning import feed_trainer
from orchestrator.ledger import Ledger
from orchestrator.stream import Proxy, Publisher, Subscriber
from planners.base import Problem, Proposal
from planners.space import FloatParameter, Objective, SearchSpace
from planners.surrogates.trainer import SurrogateTrainer

PROBLEM = Problem(
    space=SearchSpace(
        parameters=[
            FloatParameter(name="x1", lower=-5, upper=10),
            FloatParameter(name="x2", lower=0, upper=15),
        ]
    ),
    objectives=[Objective(name="y", goal="minimize")],
)
STAMP = struct.Struct(">QdB")


def frame(topic, seq, name, body_bytes):
    n = name.encode()
    return topic.encode() + b"\0" + STAMP.pack(seq, time.time(), len(n)) + n + body_bytes


def run_docs(pub, tid, p, uid):
    y = (p["x1"] - 1) ** 2 + (p["x2"] - 5) ** 2
    pub.publish(
        "doc",
        {
            "name": "start",
            "doc": {"uid": uid, "trial_id": tid, "parameters": p, "time": time.time()},
        },
    )
    pub.publish("doc", {"name": "descriptor", "doc": {"uid": uid + "-d", "run_start": uid}})
    pub.publish(
        "doc",
        {"name": "event", "doc": {"uid": uid + "-e", "descriptor": uid + "-d", "data": {"y": y}}},
    )
    pub.publish(
        "doc",
        {
            "name": "stop",
            "doc": {
                "uid": uid + "-s",
                "run_start": uid,
                "exit_status": "success",
                "time": time.time(),
            },
        },
    )


def bad_frames():
    return [
        b"garbage",
        frame("doc", 1, "forger", b"\xc1\xc1\xc1"),
        frame("doc", 2, "forger", msgpack.packb([1, 2])),
        frame("doc", 3, "forger", msgpack.packb({"name": 5, "doc": "x"})),
        frame("doc", 4, "forger", msgpack.packb({"name": "start", "doc": {"no": "uid"}})),
        frame("doc", 5, "forger", b"\x00" * (50 * 2**20)),
    ]


def _running_trials(n, seed):
    """A fresh ledger with ``n`` running trials at random points: ``(dir, ledger, id, points, trial ids)``."""
    d = tempfile.mkdtemp()
    ledger = Ledger.for_directory(d)
    cid, _ = ledger.open_campaign("c", {}, 0)
    rng = np.random.default_rng(seed)
    pts = [{"x1": float(rng.uniform(-5, 10)), "x2": float(rng.uniform(0, 15))} for _ in range(n)]
    tids = []
    for p in pts:
        t = ledger.propose(cid, Proposal(parameters=p, planner="random", seed=0))
        ledger.transition(t, "approved", "system")
        ledger.transition(t, "running", "system")
        tids.append(t)
    return d, ledger, cid, pts, tids


def bad_frames_harness(n=20):
    d, ledger, cid, pts, tids = _running_trials(n, seed=0)
    versions = []
    trainer = SurrogateTrainer(PROBLEM, d, min_points=1, on_version=versions.append)
    with Proxy() as proxy:
        pub = Publisher(proxy.publish_address, name="station-1")
        forger = Publisher(proxy.publish_address, name="forger")
        sub = Subscriber(proxy.subscribe_address, topics=("doc",))
        sub.wait_linked(forger)
        sub._synced.clear()
        sub.wait_linked(pub)
        listener = feed_trainer(trainer, ledger, cid, sub)
        forger._sock.send_multipart([b"doc\0", b"two frames"])
        for f in bad_frames():
            forger._sock.send(f)
        time.sleep(0.5)
        for i, (t, p) in enumerate(zip(tids, pts, strict=True)):
            run_docs(pub, t, p, f"run-{i}")
            deadline = time.monotonic() + 5
            while trainer.latest() is None or trainer.latest().n_points < i + 1:
                if time.monotonic() > deadline or not listener._thread.is_alive():
                    break
                time.sleep(0.01)
        time.sleep(0.5)
        alive = listener._thread.is_alive()
        listener.stop()
        trainer.stop()
        bad = getattr(sub.stats, "bad", "n/a")
    print(
        f"bad frames: results {n}, versions {len(versions)}, points {trainer.n_results}, "
        f"intake alive {alive}, bad-frame counter {bad}"
    )


def forged_seq_harness():
    with Proxy() as proxy:
        pub = Publisher(proxy.publish_address, name="station-1")
        sub = Subscriber(proxy.subscribe_address, topics=("trial",))
        sub.wait_linked(pub)
        for i in range(5):
            pub.publish("trial", {"i": i})
        forger = Publisher(proxy.publish_address, name="forger")
        sub._synced.clear()
        sub.wait_linked(forger)
        forger._sock.send(frame("trial", 2**64 - 1, "station-1", msgpack.packb({"i": "forged"})))
        time.sleep(0.3)
        for i in range(5, 25):
            pub.publish("trial", {"i": i})
        got = []
        while (m := sub.recv(timeout=1.0)) is not None:
            got.append(m.body["i"])
    real = [g for g in got if g != "forged"]
    print(
        f"forged seq: real sent 25, real received {len(real)}, after the forgery {len([g for g in real if g >= 5])}/20, "
        f"forged delivered {'forged' in got}"
    )


def forged_run_harness(n=22):
    d, ledger, cid, pts, tids = _running_trials(n, seed=1)
    trainer = SurrogateTrainer(PROBLEM, d, min_points=1)
    with Proxy() as proxy:
        pub = Publisher(proxy.publish_address, name="station-1")
        sub = Subscriber(proxy.subscribe_address, topics=("doc",))
        sub.wait_linked(pub)
        listener = feed_trainer(trainer, ledger, cid, sub)
        for i, (t, p) in enumerate(zip(tids, pts, strict=True)):
            run_docs(pub, t, p, f"run-{i}")
        run_docs(pub, 9999, {"x1": 0.0, "x2": 0.0}, "forged-1")  # no such trial
        run_docs(pub, tids[0], {"x1": 9.0, "x2": 9.0}, "forged-2")  # real trial, other parameters
        deadline = time.monotonic() + 20
        while trainer.n_results < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        listener.stop()
        trainer.stop()
    print(f"forged run: trials in ledger {n}, points the trainer took {trainer.n_results}")


if __name__ == "__main__":
    which = sys.argv[1:] or ["bad", "seq", "run"]
    if "bad" in which:
        bad_frames_harness()
    if "seq" in which:
        forged_seq_harness()
    if "run" in which:
        forged_run_harness()
