"""The surrogate trainer in its own process (``labpilot trainer DIR``) serving a campaign that runs
with ``LABPILOT_TRAINER=external``: the deployment of a GPU host training for a lab PC, on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.ledger import Ledger
from orchestrator.spec import load_campaign
from orchestrator.stream import Proxy
from planners.base import Proposal
from planners.surrogates.trainer import SurrogateTrainer
from simulators import load_problem

CAMPAIGN = """
name: external-trainer
seed: 3
parameters:
  - {name: x1, type: float, lower: -5, upper: 10}
  - {name: x2, type: float, lower: 0, upper: 15}
objectives: [{name: y, goal: minimize}]
budget: {max_trials: 12}
planner: {name: bo, options: {initial_trials: 4, num_restarts: 2, raw_samples: 64}}
instruments: [{name: reactor, simulator: branin, latency: 0.2, noise: 0.1}]
"""
INITIAL = 4


@contextmanager
def trainer_process(campaign_dir: Path, proxy: Proxy, log: Path) -> Iterator[subprocess.Popen]:
    """``labpilot trainer DIR --device cpu`` in its own process, its output in ``log``. It runs in
    DIR's parent with DIR given relative to it (another working directory than the campaign's),
    and is killed on the way out if the test left it running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABPILOT_")}
    env.update(LABPILOT_STREAM_PUBLISH=proxy.publish_address, LABPILOT_STREAM_SUBSCRIBE=proxy.subscribe_address,
               PYTHONUNBUFFERED="1", COLUMNS="200")
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "trainer", campaign_dir.name, "--device", "cpu"],
            cwd=campaign_dir.parent, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:g} s; the trainer said:\n{log.read_text()}")
        time.sleep(0.1)


def wait_listening(process: subprocess.Popen, log: Path) -> None:
    wait_until(lambda: "training surrogates" in log.read_text() or process.poll() is not None, 60,
               "the trainer did not start listening", log)
    assert process.poll() is None, log.read_text()


def stop(process: subprocess.Popen, log: Path) -> str:
    """Terminate the trainer as a service manager would; it must finish cleanly (exit 0)."""
    process.terminate()
    assert process.wait(timeout=30) == 0, log.read_text()
    said = log.read_text()
    assert "Traceback" not in said, said
    return said


def register(campaign_file: Path, directory: Path) -> tuple[Ledger, int]:
    """The campaign's ledger, with the campaign registered as ``labpilot run`` registers it."""
    spec = load_campaign(campaign_file)
    ledger = Ledger.for_directory(directory)
    cid, _ = ledger.open_campaign(spec.name, spec.model_dump(mode="json"), spec.seed)
    return ledger, cid


@pytest.mark.slow  # about 30 s on 2 busy cores, the start of the Prefect server included
def test_a_trainer_in_its_own_process_trains_the_versions_the_campaign_proposes_from(
        write_campaign, tmp_path, monkeypatch, request):
    campaign_file = write_campaign(CAMPAIGN)
    out = tmp_path / "run"
    # The trainer reads its campaign from the ledger, so it can only start once the campaign is
    # registered; 'labpilot run' then resumes it (with no trial yet). Starting the trainer first
    # and waiting until it listens makes every result reach it over the live stream, rather than
    # racing its start-up (seconds of imports) against a short campaign.
    ledger, cid = register(campaign_file, out)
    log = tmp_path / "trainer.log"
    with Proxy("tcp://127.0.0.1:0", "tcp://127.0.0.1:0") as proxy, \
            trainer_process(out, proxy, log) as trainer:
        monkeypatch.setenv("LABPILOT_STREAM_PUBLISH", proxy.publish_address)
        monkeypatch.setenv("LABPILOT_STREAM_SUBSCRIBE", proxy.subscribe_address)
        monkeypatch.setenv("LABPILOT_TRAINER", "external")
        monkeypatch.delenv("LABPILOT_LEDGER_URL", raising=False)
        request.getfixturevalue("prefect_api_url")  # a first Prefect server starts meanwhile
        wait_listening(trainer, log)

        assert main(["run", str(campaign_file), "--output", str(out), "--quiet"]) == 0

        completed = ledger.trials(cid, ("completed",))
        assert len(completed) == 12
        # the last result reaches the trainer as the campaign ends
        wait_until(lambda: any(v.n_points == len(completed) for v in ledger.model_versions(cid)), 30,
                   "no model version on every result", log)
        said = stop(trainer, log)

    # the versions: announced by the trainer process, numbered in order, each on more results (those
    # that came during an update are taken together), saved under DIR/models with absolute paths
    # (the campaign runs in another working directory)
    versions = ledger.model_versions(cid)
    assert [v.number for v in versions] == list(range(1, len(versions) + 1))
    sizes = [v.n_points for v in versions]
    assert sizes == sorted(set(sizes)) and sizes[0] >= 3 and sizes[-1] == len(completed)
    for v in versions:
        assert f"model {v.label}: {v.n_points} results" in said
        path = Path(v.path)
        assert path.is_absolute() and path.parent.samefile(out / "models")
        assert path.is_file() and path.with_suffix(".json").is_file()
    assert sorted(p.name for p in (out / "models").glob("*.pt")) == [Path(v.path).name for v in versions]

    # the proposals: bo's name the newest version the campaign had received, and once one had come
    # never bo's own fit again; model_unseen counts the results that version had not been trained on
    by_number = {v.number: v for v in versions}
    trials = ledger.trials(cid)
    assert [t.number for t in trials] == list(range(1, 13))
    named = []
    for t in trials[INITIAL:]:
        match = re.fullmatch(r"gp-v(\d+)(x[0-9.]+)?", t.proposal.model_version or "")
        if match is None:
            assert not named, f"trial {t.number} went back to bo's own fit after a version had come"
            assert t.proposal.model_version == f"gp-{t.number - 1}"
            continue
        version = by_number[int(match.group(1))]
        assert t.proposal.model_unseen == (t.number - 1) - version.n_points >= 0
        named.append(version.number)
    assert len(named) >= 3, [t.proposal.model_version for t in trials]
    assert named == sorted(named) and named[-1] > named[0]


def test_a_restarted_trainer_numbers_its_versions_after_those_in_the_ledger(write_campaign, tmp_path):
    """A reused number would overwrite the checkpoint that earlier proposals name (and that a replay
    loads), and a campaign following the trainer ignores versions numbered below its newest."""
    out = tmp_path / "run"
    campaign_file = write_campaign(CAMPAIGN)
    ledger, cid = register(campaign_file, out)
    branin = load_problem("branin")
    points = [{"x1": -3.0 + 2.5 * i, "x2": 1.0 + 2.0 * i} for i in range(5)]
    for i, p in enumerate(points):
        tid = ledger.propose(cid, Proposal(parameters=p, planner="sobol", seed=0))
        ledger.transition(tid, "approved", "system")
        ledger.transition(tid, "running", "system")
        ledger.complete(tid, {"y": float(branin.evaluate(p)["y"])}, run_uid=f"run-{i}")
    # the trainer's life before the restart: versions 1 and 2, on the first 3 and 4 results
    before = SurrogateTrainer(load_campaign(campaign_file).problem(), out, min_points=3,
                              on_version=lambda v: ledger.record_model_version(cid, v.record()))
    for t in ledger.trials(cid)[:4]:
        before.add_result(t.id, t.parameters, t.observation.values)
        before.update()
    checkpoints = {p.name: p.read_bytes() for p in (out / "models").glob("*")}
    assert [v.number for v in ledger.model_versions(cid)] == [1, 2]

    log = tmp_path / "trainer.log"
    with Proxy("tcp://127.0.0.1:0", "tcp://127.0.0.1:0") as proxy, \
            trainer_process(out, proxy, log) as trainer:
        wait_listening(trainer, log)
        assert "(5 results so far)" in log.read_text()  # caught up from the ledger
        wait_until(lambda: len(ledger.model_versions(cid)) == 3, 60, "no version after the restart", log)
        said = stop(trainer, log)

    versions = ledger.model_versions(cid)
    assert [(v.number, v.n_points) for v in versions] == [(1, 3), (2, 4), (3, 5)]
    assert "model gp-v3: 5 results" in said
    assert Path(versions[2].path).name == "v00003.pt" and Path(versions[2].path).is_file()
    assert {name: (out / "models" / name).read_bytes() for name in checkpoints} == checkpoints


class _FakeProxy:
    """Stands in for the proxy so that no test binds beyond loopback."""

    bound: list[tuple[str, str]] = []

    def __init__(self, publish: str, subscribe: str) -> None:
        self.publish_address, self.subscribe_address = publish, subscribe

    def start(self) -> _FakeProxy:
        _FakeProxy.bound.append((self.publish_address, self.subscribe_address))
        return self

    def stop(self) -> None:
        pass


def _proxy_command(monkeypatch, capsys, *args: str) -> str:
    import orchestrator.stream

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    _FakeProxy.bound = []
    monkeypatch.setattr(orchestrator.stream, "Proxy", _FakeProxy)
    monkeypatch.setattr("orchestrator.cli.time.sleep", interrupt)
    assert main(["proxy", *args]) == 0
    return capsys.readouterr().err


def test_labpilot_proxy_binds_loopback_by_default_without_a_warning(monkeypatch, capsys):
    err = _proxy_command(monkeypatch, capsys)
    assert _FakeProxy.bound == [("tcp://127.0.0.1:5577", "tcp://127.0.0.1:5578")]
    assert "warning" not in err


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:5577", "tcp://192.168.1.20:5577", "tcp://eth0:5577"])
def test_labpilot_proxy_warns_that_the_stream_has_no_authentication_when_bound_beyond_loopback(
        monkeypatch, capsys, address):
    err = " ".join(_proxy_command(monkeypatch, capsys, "--publish", address).split())
    assert "warning" in err and "no authentication" in err and address in err
