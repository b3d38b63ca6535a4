"""The surrogate trainer: learns from run documents as they stream in, versions every model."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from instruments import Instrument, InstrumentRunner
from orchestrator.learning import FixedModels
from orchestrator.stream import Listener, Proxy, Publisher, Subscriber, document_callback
from planners import make_planner
from planners.base import HistoryItem, Problem
from planners.bo import _ModelSetup
from planners.space import FloatParameter, Objective, SearchSpace
from planners.surrogates.trainer import SurrogateTrainer, load_version
from simulators import Behaviour, load_problem, make_simulated_device

PROBLEM = Problem(space=SearchSpace(parameters=[FloatParameter(name="x1", lower=-5, upper=10),
                                                FloatParameter(name="x2", lower=0, upper=15)]),
                  objectives=[Objective(name="y", goal="minimize")])


def _runner(on_document, fail: bool = False) -> InstrumentRunner:
    device = make_simulated_device(load_problem("branin"), "bench",
                                   Behaviour(failure_rate=1.0 if fail else 0.0, seed=1))
    return InstrumentRunner(Instrument(name="bench", device=device, outcomes=["y"], timeout=10),
                            on_document=on_document)


def _points(n: int, seed: int = 0) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [{"x1": float(rng.uniform(-5, 10)), "x2": float(rng.uniform(0, 15))} for _ in range(n)]


def _run(runner: InstrumentRunner, trial_id: int, point: dict[str, float]) -> None:
    md = {"trial_id": trial_id, "parameters": point, "outcome_keys": runner.instrument.data_keys}
    try:
        runner.run(point, md)
    except Exception:  # noqa: BLE001 - a failing instrument is part of some tests
        pass


def test_trainer_turns_each_run_into_a_training_point_and_bumps_the_version(tmp_path):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=3).start()
    runner = _runner(trainer)
    try:
        points = _points(5)
        for i, p in enumerate(points[:3]):
            _run(runner, i + 1, p)
        v1 = trainer.wait_for(3, timeout=30)
        assert (v1.kind, v1.n_points) == ("gp", 3)
        _run(runner, 4, points[3])
        v2 = trainer.wait_for(4, timeout=30)
        assert v2.number > v1.number and v2.data_hash != v1.data_hash
        assert (tmp_path / "models" / f"v{v2.number:05d}.pt").is_file()
        assert (tmp_path / "models" / f"v{v2.number:05d}.json").is_file()
        # the 4th result reached the model: its prediction there moves to the measured value
        truth = float(load_problem("branin").evaluate(points[3])["y"])
        X = PROBLEM.space.encode([points[3]]).double()
        before = float(v1.targets.to_measured(v1.surrogate.predict(X)[0])["y"])
        after = float(v2.targets.to_measured(v2.surrogate.predict(X)[0])["y"])
        assert abs(after - truth) < abs(before - truth)
    finally:
        trainer.stop()


def test_a_failed_run_is_counted_and_never_trained_on(tmp_path):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=1)
    _run(_runner(trainer, fail=True), 9, _points(1)[0])
    assert trainer.failures == {9}
    assert trainer.n_results == 0
    assert trainer.update() is None


def test_results_from_the_stream_train_the_model_like_in_process_ones(tmp_path):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=3).start()
    with Proxy() as proxy:
        pub = Publisher(proxy.publish_address)
        sub = Subscriber(proxy.subscribe_address, topics=("doc",))
        sub.wait_linked(pub)
        listener = Listener(sub, document_callback(trainer)).start()
        runner = _runner(pub.document_callback("bench"))
        try:
            for i, p in enumerate(_points(4, seed=3)):
                _run(runner, i + 1, p)
            v = trainer.wait_for(4, timeout=30)
            assert v.n_points == 4 and trainer.n_results == 4
        finally:
            listener.stop()
            trainer.stop()
            pub.close()


def test_a_version_reloads_from_its_checkpoint_to_the_same_predictions(tmp_path):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=3)
    ys = []
    for i, p in enumerate(_points(6, seed=4)):
        y = float(load_problem("branin").evaluate(p)["y"])
        ys.append(y)
        trainer.add_result(i, p, {"y": y})
    version = trainer.update()
    assert version is not None and version.n_points == 6
    again = load_version(version.record())
    X = torch.rand(7, 2, dtype=torch.double)
    m1, v1 = version.surrogate.predict(X)
    m2, v2 = again.surrogate.predict(X)
    assert torch.allclose(m1, m2, rtol=1e-8) and torch.allclose(v1, v2, rtol=1e-8)
    assert again.targets == version.targets and again.data_hash == version.data_hash


def test_each_result_is_checked_against_the_prediction_made_before_training_on_it(tmp_path):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=3)
    pts = _points(12, seed=5)
    f = load_problem("branin")
    for i, p in enumerate(pts[:6]):
        trainer.add_result(i, p, {"y": float(f.evaluate(p)["y"])})
    trainer.update()
    assert trainer.calibration.summary()["overall"]["count"] == 0  # nothing was predicted yet
    for i, p in enumerate(pts[6:], start=6):
        trainer.add_result(i, p, {"y": float(f.evaluate(p)["y"])})
    summary = trainer.calibration.summary()
    assert summary["overall"]["count"] == 6
    version = trainer.update()
    assert version.calibration["overall"]["count"] == 6
    assert version.inflation >= 1.0


def test_catch_up_results_are_trained_on_without_a_calibration_check(tmp_path):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=3)
    f = load_problem("branin")
    trainer.catch_up([(i, p, {"y": float(f.evaluate(p)["y"])}) for i, p in enumerate(_points(5, 6))])
    trainer.catch_up([(0, {"x1": 0.0, "x2": 0.0}, {"y": 1.0})])  # a repeat of a key is ignored
    v = trainer.update()
    assert v.n_points == 5 and trainer.calibration.summary()["overall"]["count"] == 0


def test_the_deep_ensemble_takes_over_at_switch_at_and_is_then_warm_started(tmp_path):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=3, switch_at=8,
                               ensemble_options={"max_steps": 300})
    f = load_problem("branin")
    pts = _points(10, seed=7)
    for i, p in enumerate(pts[:7]):
        trainer.add_result(i, p, {"y": float(f.evaluate(p)["y"])})
    assert trainer.update().kind == "gp"
    trainer.add_result(7, pts[7], {"y": float(f.evaluate(pts[7])["y"])})
    v = trainer.update()
    assert (v.kind, v.metrics["update"]) == ("ensemble", "fit")
    trainer.add_result(8, pts[8], {"y": float(f.evaluate(pts[8])["y"])})
    v = trainer.update()
    assert (v.kind, v.metrics["update"], v.n_points) == ("ensemble", "warm", 9)


def test_a_failing_update_keeps_the_last_good_model_and_says_why(tmp_path, monkeypatch):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=3).start()
    f = load_problem("branin")
    try:
        for i, p in enumerate(_points(3, seed=8)):
            trainer.add_result(i, p, {"y": float(f.evaluate(p)["y"])})
        good = trainer.wait_for(3, timeout=30)
        monkeypatch.setattr(trainer._surrogate, "update", lambda *a, **k: 1 / 0)
        trainer.add_result(99, {"x1": 1.0, "x2": 2.0}, {"y": 20.0})
        deadline = time.monotonic() + 10
        while not trainer.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trainer.errors and "ZeroDivisionError" in trainer.errors[-1]
        assert trainer.latest() is good
    finally:
        trainer.stop()


def test_a_result_without_a_finite_value_for_every_outcome_is_refused(tmp_path):
    trainer = SurrogateTrainer(PROBLEM, tmp_path)
    with pytest.raises(ValueError, match="y"):
        trainer.add_result(1, {"x1": 1.0, "x2": 2.0}, {"y": float("nan")})
    with pytest.raises(ValueError, match="y"):
        trainer.add_result(2, {"x1": 1.0, "x2": 2.0}, {})
    assert trainer.n_results == 0


def test_bad_trainer_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="switch_at"):
        SurrogateTrainer(PROBLEM, "/tmp/x", switch_at=2, min_points=3)


# ---- the planner on trained versions ---------------------------------------------------
def _trained(tmp_path, n: int, **kw):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=3, **kw)
    f = load_problem("branin")
    history = []
    for i, p in enumerate(_points(n, seed=9)):
        y = float(f.evaluate(p)["y"])
        trainer.add_result(i, p, {"y": y})
        history.append(HistoryItem(p, "completed", {"y": y}))
    return trainer.update(), history


@pytest.mark.parametrize("kind, switch_at", [("gp", 1000), ("ensemble", 5)])
def test_bo_proposes_from_the_newest_trained_version_and_says_which(tmp_path, kind, switch_at):
    version, history = _trained(tmp_path, 8, switch_at=switch_at, ensemble_options={"max_steps": 300})
    assert version.kind == kind
    planner = make_planner("bo", PROBLEM, seed=1, options={"initial_trials": 4, "num_restarts": 2,
                                                           "raw_samples": 32})
    planner.surrogate_source = FixedModels(version)
    more = history + [HistoryItem({"x1": 2.0, "x2": 3.0}, "completed", {"y": 20.0})]  # one it has not seen
    prop = planner.ask(1, more, [])[0]
    assert prop.model_version == version.label
    assert prop.model_unseen == 1
    assert prop.ood_score is not None and prop.ood_score >= 0
    assert -5 <= prop.parameters["x1"] <= 10 and 0 <= prop.parameters["x2"] <= 15
    assert math.isfinite(prop.predicted_mean["y"]) and prop.predicted_sd["y"] > 0


def test_a_version_whose_intervals_proved_too_narrow_makes_the_planner_widen_them(tmp_path):
    version, history = _trained(tmp_path, 8)
    X = PROBLEM.space.encode([{"x1": 1.0, "x2": 1.0}]).double()

    def setup(inflation: float, **options):
        planner = make_planner("bo", PROBLEM, seed=1, options={"initial_trials": 4, **options})
        completed = planner.completed(history)
        s = _ModelSetup(planner, completed, [], replace(version, inflation=inflation))
        with torch.no_grad():
            post = s.model.posterior(X)
        return planner, float(post.mean), float(post.variance)

    _, mean, var = setup(1.0)
    for inflation, options, factor in ((1.2, {}, 1.2),                      # widened by the measured factor
                                       (3.0, {}, 1.5),                      # ... up to max_widening (1.5)
                                       (3.0, {"max_widening": 4.0}, 3.0),
                                       (3.0, {"max_widening": 1.0}, 1.0)):  # 1: never widened
        planner, m, v = setup(inflation, **options)
        assert v / var == pytest.approx(factor**2, rel=1e-6), (inflation, options)
        assert abs(m - mean) < 1e-9
        planner.surrogate_source = FixedModels(replace(version, inflation=inflation))
        label = planner.ask(1, history, [])[0].model_version
        assert label == (version.label if factor == 1 else f"{version.label}x{factor:.2g}")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # every device this machine has


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_and_planner_run_on_each_device_there_is(tmp_path, device):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=3, switch_at=7, device=device,
                               ensemble_options={"max_steps": 200})
    f = load_problem("branin")
    history = []
    for i, p in enumerate(_points(8, seed=11)):
        y = float(f.evaluate(p)["y"])
        trainer.add_result(i, p, {"y": y})
        history.append(HistoryItem(p, "completed", {"y": y}))
        if i in (5, 7):  # a GP version, then an ensemble one
            version = trainer.update()
            assert version.kind == ("gp" if i == 5 else "ensemble")
            assert str(trainer.device).startswith(device)
            planner = make_planner("bo", PROBLEM, seed=0, options={"initial_trials": 3, "num_restarts": 2,
                                                                   "raw_samples": 32})
            planner.surrogate_source = FixedModels(version)
            prop = planner.ask(1, history, [])[0]
            assert prop.model_version == version.label and math.isfinite(prop.predicted_mean["y"])


# ---- what reaches the trainer off the stream ------------------------------------------
def _run_documents(callback, uid: str, trial_id, point: dict[str, float]) -> None:
    """One run's documents as a RunEngine emits them (start, descriptor, event, stop)."""
    y = float(load_problem("branin").evaluate(point)["y"])
    callback("start", {"uid": uid, "time": time.time(), "trial_id": trial_id, "parameters": point})
    callback("descriptor", {"uid": f"{uid}-d", "run_start": uid})
    callback("event", {"uid": f"{uid}-e", "descriptor": f"{uid}-d", "data": {"y": y}})
    callback("stop", {"uid": f"{uid}-s", "run_start": uid, "exit_status": "success", "time": time.time()})


def test_a_document_without_the_fields_of_a_run_document_is_counted_and_skipped(tmp_path):
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=1)
    trainer("start", {"no": "uid"})
    trainer("start", {"uid": "u", "trial_id": [1], "parameters": {}})  # a key that is no key
    trainer("descriptor", {"uid": 5, "run_start": "u"})
    trainer("event", {"descriptor": 7, "data": {}})
    trainer("stop", {"run_start": None})
    assert trainer.rejected == 5
    _run_documents(trainer, "real", 1, _points(1)[0])
    assert trainer.n_results == 1


def test_bad_frames_on_the_stream_never_stop_the_trainer_learning_from_every_real_result(tmp_path):
    import struct

    import msgpack

    from orchestrator.learning import feed_trainer
    from orchestrator.ledger import Ledger
    from planners.base import Proposal

    n = 10
    ledger = Ledger.for_directory(tmp_path)
    cid, _ = ledger.open_campaign("c", {}, 0)
    points = _points(n, seed=5)
    ids = []
    for p in points:
        tid = ledger.propose(cid, Proposal(parameters=p, planner="random", seed=0))
        ledger.transition(tid, "approved", "system")
        ledger.transition(tid, "running", "system")
        ids.append(tid)
    versions = []
    trainer = SurrogateTrainer(PROBLEM, tmp_path, min_points=1, on_version=versions.append)

    def frame(seq: int, body: bytes) -> bytes:
        return b"doc\0" + struct.pack(">QdB", seq, time.time(), 6) + b"forger" + body

    with Proxy() as proxy:
        pub, forger = Publisher(proxy.publish_address, name="station-1"), Publisher(proxy.publish_address)
        sub = Subscriber(proxy.subscribe_address, topics=("doc",))
        for p in (forger, pub):
            sub._synced.clear()
            sub.wait_linked(p)
        listener = feed_trainer(trainer, ledger, cid, sub)
        try:
            forger._sock.send_multipart([b"doc\0", b"two frames"])
            forger._sock.send(frame(1, b"\xc1 not msgpack"))
            forger._sock.send(frame(2, msgpack.packb({"name": "start", "doc": {"no": "uid"}})))
            forger._sock.send(frame(3, b"\0" * 50 * 2**20))
            callback = pub.document_callback("bench")
            for i, (tid, p) in enumerate(zip(ids, points, strict=True)):
                _run_documents(callback, f"run-{i}", tid, p)
                trainer.wait_for(i + 1, timeout=20)  # one version per result
            assert len(versions) == n and versions[-1].n_points == n
            assert sub.stats.bad > 0 and trainer.rejected == 1
        finally:
            listener.stop()
            trainer.stop()
            pub.close()
            forger.close()
