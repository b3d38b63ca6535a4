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
