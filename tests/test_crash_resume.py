"""SIGKILL at random moments, resumed each time: nothing lost, nothing run twice, the budget held."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.ledger import FINAL_STATES, Ledger, sqlite_url

ROOT = Path(__file__).resolve().parents[1]

CAMPAIGN = """
name: crash-{seed}
seed: {seed}
parameters:
  - {{name: x1, type: float, lower: -5, upper: 10}}
  - {{name: x2, type: float, lower: 0, upper: 15}}
objectives: [{{name: y, goal: minimize}}]
budget: {{max_trials: {trials}}}
planner: {{name: {planner}}}
instruments: [{{name: reactor, device: 'tests.journal_device:make_reactor', outcomes: [y], timeout: 20}}]
"""


def _launch(path: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--output", str(out),
                             "--quiet"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def crash_and_resume(directory: Path, kills: int, trials: int, seed: int, planner: str, env: dict,
                     rng: random.Random, window: tuple[float, float] = (2.0, 7.0)) -> dict:
    """Run a campaign, SIGKILL its process group ``kills`` times at random moments (resuming each
    time), then let it finish; compare the device's journal with the ledger."""
    path = directory / "campaign.yaml"
    path.write_text(CAMPAIGN.format(seed=seed, trials=trials, planner=planner))
    out, journal = directory / "run", directory / "journal.txt"
    env = {**env, "LABPILOT_TEST_JOURNAL": str(journal), "PYTHONPATH": str(ROOT)}
    done_kills = 0
    while done_kills < kills:
        proc = _launch(path, out, env)
        try:
            proc.wait(timeout=rng.uniform(*window))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            done_kills += 1
        else:
            break  # it finished before this kill
    proc = _launch(path, out, env)
    _, err = proc.communicate(timeout=300)
    ledger = Ledger(sqlite_url(out))
    cid = ledger.campaign().id
    trials_ = ledger.trials(cid)
    lines = journal.read_text().split("\n") if journal.exists() else []
    runs = [tuple(line.split()[1:3]) for line in lines if line.startswith("run ")]
    measured = {tuple(line.split()[1:3]): float(line.split()[3]) for line in lines if line.startswith("measured ")}
    completed = {(repr(float(t.parameters["x1"])), repr(float(t.parameters["x2"]))): t.observation.values["y"]
                 for t in trials_ if t.state == "completed"}
    # a measurement the device finished whose stop document reached the ledger, yet not completed
    # (a ledger without a document journal, as on main, can show none)
    documents = getattr(ledger, "documents", lambda trial_id: [])
    lost_recorded = [t.number for t in trials_ if t.state != "completed"
                     and any(n == "stop" and d.get("exit_status") == "success" for n, d in documents(t.id))]
    result = {
        "kills": done_kills, "exit_code": proc.returncode, "stderr": err[-2000:],
        "device_runs": len(runs), "budget": trials,
        "repeats": len(runs) - len(set(runs)),
        "lost": sum(1 for p in measured if p not in completed),  # measured by the device, not in the ledger
        "lost_recorded": len(lost_recorded),
        "wrong_values": sum(1 for p, y in measured.items() if p in completed and completed[p] != y),
        "not_final": sum(1 for t in trials_ if t.state not in FINAL_STATES),
        "runs_done": sum(1 for t in trials_ if t.started_at is not None and t.state in FINAL_STATES),
        "numbers_unique": len({t.number for t in trials_}) == len(trials_),
    }
    ledger.close()
    return result


@pytest.mark.slow
def test_sigkilled_campaign_resumes_with_nothing_lost_or_run_twice_and_the_budget_held(tmp_path, prefect_api_url):
    """On main 27 kills over three 40-trial campaigns lost 4 results, ran 15 points twice and
    made 137 runs for a budget of 120 (the sequence skipped ahead by history + pending, which
    left out abandoned trials, and abandoned trials did not count against the budget)."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "LABPILOT_TEST_LATENCY": "0.3"}
    r = crash_and_resume(tmp_path, kills=4, trials=10, seed=3, planner="sobol", env=env, rng=random.Random(7))
    assert r["exit_code"] == 0, r["stderr"]
    assert r["kills"] >= 3
    assert r["repeats"] == 0, r
    assert r["device_runs"] <= r["budget"] and r["runs_done"] == r["budget"], r
    assert r["lost_recorded"] == 0 and r["wrong_values"] == 0, r
    assert r["lost"] <= 1, r  # only a kill in the milliseconds between the measurement and its stop document
    assert r["not_final"] == 0 and r["numbers_unique"], r


def _descendants(pid: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def test_a_sigkilled_campaign_takes_its_temporary_prefect_server_with_it(tmp_path):
    """On main a SIGKILL of the campaign alone left the temporary server running with PPID 1."""
    (tmp_path / "c.yaml").write_text(CAMPAIGN.format(seed=1, trials=30, planner="sobol"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(LABPILOT_TEST_JOURNAL=str(tmp_path / "journal.txt"), PYTHONPATH=str(ROOT), LABPILOT_TEST_LATENCY="1")
    proc = _launch(tmp_path / "c.yaml", tmp_path / "run", env)
    deadline, children = time.monotonic() + 120, set()
    while time.monotonic() < deadline and not (tmp_path / "journal.txt").exists():
        time.sleep(0.2)
    children = _descendants(proc.pid)
    assert children, "the campaign started no temporary server"
    proc.kill()  # the main process alone
    proc.wait()
    gone = time.monotonic() + 15
    while time.monotonic() < gone and any(Path(f"/proc/{p}").exists() for p in children):
        time.sleep(0.2)
    alive = [p for p in children if Path(f"/proc/{p}").exists()]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, "the temporary Prefect server outlived the campaign"


def test_two_runs_on_one_directory_one_runs_the_other_says_who_holds_it(tmp_path, prefect_api_url):
    """On main two runs started together made 61 trials for a budget of 60, numbered 17 twice,
    ran 5 experiments twice, and both exited 0."""
    path = tmp_path / "campaign.yaml"
    path.write_text(CAMPAIGN.format(seed=2, trials=6, planner="sobol"))
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "LABPILOT_TEST_LATENCY": "0.3",
           "LABPILOT_TEST_JOURNAL": str(tmp_path / "journal.txt"), "PYTHONPATH": str(ROOT)}
    procs = [_launch(path, tmp_path / "run", env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = " ".join(next(err for code, err in results if code == 2).split())
    assert "is being run by" in refused
    assert f":{procs[0].pid}:" in refused or f":{procs[1].pid}:" in refused  # the holder, by host:pid
    runs = [line for line in (tmp_path / "journal.txt").read_text().split("\n") if line.startswith("run ")]
    assert len(runs) == len(set(runs)) == 6
    ledger = Ledger(sqlite_url(tmp_path / "run"))
    trials = ledger.trials(ledger.campaign().id)
    assert sorted(t.number for t in trials) == list(range(1, 7))
    assert all(t.state == "completed" for t in trials)
    ledger.close()


def test_a_resumed_file_that_changes_what_is_optimised_is_refused_and_nothing_changes(tmp_path, prefect_api_url):
    """On main a parameter added on resume was accepted, then bo crashed with KeyError."""
    from orchestrator.cli import main

    text = CAMPAIGN.format(seed=4, trials=3, planner="sobol").replace(
        "device: 'tests.journal_device:make_reactor', outcomes: [y], timeout: 20", "simulator: branin, latency: 0.01")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    path.write_text(text.replace("  - {name: x2, type: float, lower: 0, upper: 15}\n",
                                 "  - {name: x2, type: float, lower: 0, upper: 15}\n"
                                 "  - {name: x3, type: float, lower: 0, upper: 1}\n"))
    assert main(["run", str(path), "--output", str(out), "--quiet"]) == 2
    ledger = Ledger(sqlite_url(out))
    campaign = ledger.campaign()
    assert campaign.status == "finished" and len(campaign.spec["parameters"]) == 2
    assert campaign.lock_owner is None
    # a safe change (a larger budget) is taken and recorded
    path.write_text(text.replace("max_trials: 3", "max_trials: 4"))
    assert main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    campaign = ledger.campaign()
    assert ledger.runs_done(campaign.id) == 4 and campaign.spec_changes[-1]["changed"]["budget"][1]["max_trials"] == 4
    ledger.close()


def test_the_wall_time_budget_counts_every_session(tmp_path, prefect_api_url):
    """On main a 12 s budget ran 62 s over 3 resumes: each resume started the clock again."""
    from orchestrator.cli import main

    text = CAMPAIGN.format(seed=5, trials=1000, planner="random").replace(
        "device: 'tests.journal_device:make_reactor', outcomes: [y], timeout: 20", "simulator: branin, latency: 0.2"
    ).replace("budget: {max_trials: 1000}", "budget: {max_trials: 1000, max_wall_time: 2}")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    ledger = Ledger(sqlite_url(out))
    cid = ledger.campaign().id
    first = ledger.runs_done(cid)
    assert first >= 2 and ledger.campaign().wall_seconds >= 2
    assert main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    assert ledger.runs_done(cid) == first  # the budget was already spent
    assert "wall-time budget spent" in ledger.campaign().stop_reason
    ledger.close()


def test_a_trial_recorded_on_resume_from_its_documents_keeps_its_units(tmp_path):
    """A crash after the measurement: the resumed campaign records the result from the run's
    documents in the ledger, with the units the campaign file declares."""
    from orchestrator.flows import CampaignRuntime
    from orchestrator.spec import parse_campaign
    from planners.base import Proposal

    spec = parse_campaign({
        "name": "units-on-resume", "seed": 1, "objectives": [{"y": "minimize"}],
        "parameters": [{"name": "x1", "type": "float", "lower": -5, "upper": 10},
                       {"name": "x2", "type": "float", "lower": 0, "upper": 15}],
        "instruments": [{"name": "bench", "simulator": "branin", "units": {"y": "mW"}}]})
    first = CampaignRuntime(spec, tmp_path)
    ledger, cid = first.ledger, first.campaign_id
    trial = ledger.propose(cid, Proposal(parameters={"x1": 1.0, "x2": 2.0}, planner="sobol", seed=1))
    ledger.transition(trial, "approved", "system")
    ledger.transition(trial, "running", "system", instrument="bench")
    _, docs = first.runners[0].run({"x1": 1.0, "x2": 2.0}, {"trial_id": trial})
    for name, doc in docs:  # what the journal wrote before the "crash"
        ledger.record_document(trial, name, doc)
    first.close()
    again = CampaignRuntime(spec, tmp_path)
    try:
        again.recover()
        row = again.ledger.trial(trial)
        assert row.state == "completed" and row.observation.units == {"y": "mW"}
    finally:
        again.close()
