"""Model versions in a running campaign: trained from the stream, recorded, used by the planner."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.learning import CampaignStream, LiveModels
from orchestrator.ledger import Ledger, sqlite_url
from orchestrator.stream import Subscriber
from planners.base import Problem
from planners.space import FloatParameter, Objective, SearchSpace
from planners.surrogates.trainer import SurrogateTrainer

CAMPAIGN = """
name: live-models
seed: 5
parameters:
  - {name: x1, type: float, lower: -5, upper: 10}
  - {name: x2, type: float, lower: 0, upper: 15}
objectives: [{name: y, goal: minimize}]
budget: {max_trials: 12}
planner: {name: bo, options: {initial_trials: 4, num_restarts: 2, raw_samples: 64}}
instruments: [{name: reactor, simulator: branin, latency: 0.2, noise: 0.1}]
"""

PROBLEM = Problem(space=SearchSpace(parameters=[FloatParameter(name="x1", lower=-5, upper=10),
                                                FloatParameter(name="x2", lower=0, upper=15)]),
                  objectives=[Objective(name="y", goal="minimize")])


@pytest.mark.usefixtures("prefect_api_url")
def test_a_campaign_records_model_versions_and_each_proposal_names_the_one_it_used(write_campaign, tmp_path,
                                                                                     capsys):
    out = tmp_path / "run"
    assert main(["run", str(write_campaign(CAMPAIGN)), "--output", str(out), "--quiet"]) == 0
    ledger = Ledger(sqlite_url(out))
    cid = ledger.campaign().id
    versions = ledger.model_versions(cid)
    assert versions, "the in-process trainer should have trained on the streamed results"
    assert [v.number for v in versions] == list(range(1, len(versions) + 1))
    assert [v.n_points for v in versions] == sorted(v.n_points for v in versions)
    assert versions[-1].n_points >= 10  # it kept up with the results
    assert all(Path(v.path).is_file() for v in versions)
    assert all(v.kind == "gp" and v.data_hash for v in versions)

    trials = ledger.trials(cid)
    model_based = [t.proposal for t in trials[4:]]
    used = [p.model_version for p in model_based]
    assert any(re.fullmatch(r"gp-v\d+", u or "") for u in used), used
    for p in model_based:
        assert p.model_unseen is not None and p.model_unseen >= 0
        assert p.ood_score is not None and p.ood_score >= 0
    numbers = [int(m.group(1)) for u in used if (m := re.search(r"-v(\d+)", u or ""))]
    assert numbers == sorted(numbers)  # the planner always took the newest version it had

    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert used[-1] in shown


def test_a_version_trained_elsewhere_reaches_the_campaign_over_the_stream(tmp_path):
    ledger = Ledger.for_directory(tmp_path)
    cid, _ = ledger.open_campaign("c", {}, 0)
    stream = CampaignStream(ledger, cid).start()
    try:
        follower = LiveModels(stream, PROBLEM, tmp_path, mode="external").start()
        # the remote trainer: its own process in the lab, here a trainer recording to the same
        # ledger, whose news the stream carries
        probe = Subscriber(stream.subscribe_address, topics=("model",))
        probe.wait_linked(stream.publisher)
        remote = SurrogateTrainer(PROBLEM, tmp_path, min_points=3,
                                  on_version=lambda v: ledger.record_model_version(cid, v.record()))
        for i, (a, b, y) in enumerate([(0.0, 1.0, 30.0), (5.0, 5.0, 20.0), (-3.0, 12.0, 10.0),
                                       (9.0, 2.0, 5.0)]):
            remote.add_result(i, {"x1": a, "x2": b}, {"y": y})
        made = remote.update()
        deadline = time.monotonic() + 10
        while follower.latest() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        got = follower.latest()
        assert got is not None and got.number == made.number and got.n_points == 4
        assert got.data_hash == made.data_hash
        assert probe.recv(timeout=5).body["label"] == made.label
        follower.stop()
    finally:
        stream.stop()


def test_the_trainer_learns_only_from_runs_the_ledger_holds_as_this_campaigns_trials(tmp_path):
    from orchestrator.learning import LedgerCheck, feed_trainer
    from orchestrator.stream import Proxy, Publisher
    from planners.base import Proposal

    ledger = Ledger.for_directory(tmp_path)
    cid, _ = ledger.open_campaign("c", {}, 0)
    other, _ = ledger.open_campaign("other", {}, 0)

    def trial(campaign: int, x: float, state: str = "running") -> int:
        tid = ledger.propose(campaign, Proposal(parameters={"x": x}, planner="random", seed=0))
        if state != "proposed":
            ledger.transition(tid, "approved", "system")
            ledger.transition(tid, "running", "system")
        return tid

    real = [trial(cid, 0.1 * i) for i in range(5)]  # running: their stops come before the ledger's completion
    done = trial(cid, 0.9)
    ledger.complete(done, {"y": 0.81}, run_uid="the-real-run")
    waiting, elsewhere = trial(cid, 0.7, state="proposed"), trial(other, 0.6)
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=1)
    trainer.catch_up = lambda results: None  # only what comes over the stream is counted here
    with Proxy() as proxy:
        pub = Publisher(proxy.publish_address, name="station-1")
        sub = Subscriber(proxy.subscribe_address, topics=("doc",))
        sub.wait_linked(pub)
        check = LedgerCheck(trainer, ledger, cid)
        listener = feed_trainer(trainer, ledger, cid, sub, check=check)
        send = pub.document_callback("bench")

        def run(uid: str, trial_id, x: float) -> None:
            send("start", {"uid": uid, "trial_id": trial_id, "parameters": {"x": x}})
            send("descriptor", {"uid": f"{uid}-d", "run_start": uid})
            send("event", {"uid": f"{uid}-e", "descriptor": f"{uid}-d", "data": {"y": x * x}})
            send("stop", {"uid": f"{uid}-s", "run_start": uid, "exit_status": "success"})

        try:
            for i, tid in enumerate(real):
                run(f"run-{i}", tid, 0.1 * i)
            run("forged-1", 9999, 0.5)  # no such trial
            run("forged-2", real[0] + 100, 0.5)  # no such trial either
            run("forged-3", waiting, 0.7)  # a trial that never reached an instrument
            run("forged-4", elsewhere, 0.6)  # another campaign's trial
            run("forged-5", "1", 0.0)  # not a trial id
            run("forged-6", done, 0.9)  # a completed trial, measured by another run
            deadline = time.monotonic() + 10
            while check.untrusted < 6 and time.monotonic() < deadline:
                time.sleep(0.02)
            run("forged-7", real[1], 0.55)  # a running trial, other parameters: sent last to see it too
            while check.untrusted < 7 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            assert check.untrusted == 7
            assert trainer.n_results == len(real)
            assert trainer._runs == {}  # the forged runs are forgotten, not kept open
        finally:
            listener.stop()
            trainer.stop()
            pub.close()
