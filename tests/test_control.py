"""Operators steer a running campaign: every verb through the command line changes what the
campaign does (proved by a device that journals every run it is asked to make) and leaves an
audit row; commands to a campaign that is not running apply when it resumes."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.control import Actor, Control, ControlError, Forbidden
from orchestrator.flows import CampaignRuntime, run_campaign
from orchestrator.ledger import Ledger, sqlite_url
from orchestrator.spec import CampaignError, load_campaign

pytestmark = pytest.mark.usefixtures("prefect_api_url")

CAMPAIGN = """
name: steer
seed: 5
parameters:
  - {{name: x1, type: float, lower: -5, upper: 10}}
  - {{name: x2, type: float, lower: 0, upper: 15}}
objectives: [{{name: y, goal: minimize}}]
budget: {{max_trials: {trials}}}
planner: {{name: sobol}}
instruments: [{instrument}]
safety: {{limits: {{x1: {{max: 5}}}}}}
approval: {approval}
"""
REACTOR = "{name: reactor, device: 'tests.journal_device:make_reactor', outcomes: [y], timeout: 30}"
PERSON = "{name: chemist, kind: manual, outcomes: [y]}"


def _write(tmp_path: Path, trials: int = 3, approval: str = "{policy: auto}", instrument: str = REACTOR) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(CAMPAIGN.format(trials=trials, approval=approval, instrument=instrument))
    return path


def runs(journal: Path) -> list[tuple[float, float]]:
    """The points that reached the instrument (its own journal)."""
    return [(float(a), float(b)) for line in journal.read_text().splitlines()
            if line.startswith("run ") for a, b in [line.split()[1:3]]]


class Running:
    """A campaign run in a thread of this process, as `labpilot run` runs it."""

    def __init__(self, path: Path, out: Path) -> None:
        self.runtime = CampaignRuntime(load_campaign(path), out)
        self.out, self.result, self.error = out, None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = run_campaign(self.runtime)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.runtime.close()

    def join(self, timeout: float = 60) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the campaign did not end"
        assert self.error is None, self.error


@contextmanager
def running(path: Path, out: Path):
    run = Running(path, out)
    try:
        yield run
    finally:
        if run.thread.is_alive():
            main(["stop", str(out), "--wait", "0"])
            for t in Ledger(sqlite_url(out)).trials(run.runtime.campaign_id, ("running",)):
                main(["abandon", str(out), str(t.number), "--wait", "0"])
            run.thread.join(60)


def until(check, timeout: float = 30.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def trials(out: Path) -> dict[int, object]:
    ledger = Ledger(sqlite_url(out))
    return {t.number: t for t in ledger.trials(ledger.campaign().id)}


def waiting(out: Path) -> list:
    return [t for t in trials(out).values() if t.state == "proposed" and t.awaiting]


def audit(out: Path) -> list:
    return Ledger(sqlite_url(out)).commands()


def test_manual_approval_dispatches_nothing_until_a_person_approves(tmp_path, journal, capsys):
    out = tmp_path / "run"
    with running(_write(tmp_path, trials=2, approval="{policy: manual}"), out):
        first = until(lambda: waiting(out), what="a proposal waiting for approval")[0]
        time.sleep(1.0)  # the campaign keeps polling; nothing may reach the instrument meanwhile
        assert runs(journal) == []
        assert len(waiting(out)) == 1  # one station: one proposal waits, no more are asked for
        assert main(["approve", str(out), str(first.number), "--reason", "looks sane"]) == 0
        assert "approved" in capsys.readouterr().out
        until(lambda: trials(out)[first.number].state == "completed", what="the approved trial completing")
        assert runs(journal) == [(first.parameters["x1"], first.parameters["x2"])]
        row = next(c for c in audit(out) if c.action == "approve")
        assert (row.status, row.trial_number, row.reason, row.via) == ("applied", first.number, "looks sane", "cli")
        events = [(e.to_state, e.actor) for e in trials(out)[first.number].events]
        assert ("approved", "operator") in events
        second = until(lambda: waiting(out), what="the next proposal waiting")[0]
        assert main(["reject", str(out), str(second.number)]) == 2  # a rejection needs a reason
        assert main(["reject", str(out), str(second.number), "--reason", "too close to the last"]) == 0
        assert trials(out)[second.number].state == "rejected"
        assert "too close to the last" in trials(out)[second.number].reason
        assert len(runs(journal)) == 1


def test_an_edited_proposal_that_leaves_the_envelope_is_vetoed_not_run(tmp_path, journal, capsys):
    out = tmp_path / "run"
    with running(_write(tmp_path, trials=2, approval="{policy: manual}"), out):
        first = until(lambda: waiting(out), what="a proposal waiting")[0]
        # x1 = 8 is inside the search space [-5, 10] but outside the envelope (x1 <= 5)
        assert main(["approve", str(out), str(first.number), "--edit", "x1=8"]) == 2
        assert "vetoed" in capsys.readouterr().err
        t = trials(out)[first.number]
        assert t.state == "vetoed" and t.parameters["x1"] == 8.0
        assert t.proposal.parameters["x1"] == first.parameters["x1"]  # the planner's own stays on record
        second = until(lambda: waiting(out), what="the next proposal")[0]
        assert main(["approve", str(out), str(second.number), "--edit", "x1=1.5", "--edit", "x2=2"]) == 0
        until(lambda: trials(out)[second.number].state == "completed", what="the edited trial completing")
    assert runs(journal) == [(1.5, 2.0)]  # the edited point ran, the vetoed one never did


def test_pause_dispatches_nothing_more_and_resume_goes_on(tmp_path, journal):
    out = tmp_path / "run"
    with running(_write(tmp_path, trials=30), out) as run:
        until(lambda: len(runs(journal)) >= 2, what="two runs")
        assert main(["pause", str(out)]) == 0
        started = len(runs(journal))
        until(lambda: not [t for t in trials(out).values() if t.state == "running"], what="the running trial ending")
        time.sleep(1.0)
        assert len(runs(journal)) <= started + 1  # at most the one that had started when it was told
        paused_at = len(runs(journal))
        time.sleep(0.5)
        assert len(runs(journal)) == paused_at
        assert Ledger(sqlite_url(out)).campaign().paused is True
        assert main(["pause", str(out)]) == 2  # already paused: refused, with the reason
        assert main(["resume", str(out)]) == 0
        until(lambda: len(runs(journal)) > paused_at + 1, what="dispatch after resume")
        assert main(["budget", str(out), "--max-trials", str(paused_at + 3)]) == 0
        run.join()
    campaign = Ledger(sqlite_url(out)).campaign()
    assert campaign.status == "finished", campaign.stop_reason
    assert len(runs(journal)) == paused_at + 3
    assert [(c.action, c.status) for c in reversed(audit(out))][:4] == [
        ("pause", "applied"), ("pause", "refused"), ("resume", "applied"), ("budget", "applied")]


def test_abandon_aborts_the_run_and_requeue_runs_the_point_again(tmp_path, journal, monkeypatch):
    monkeypatch.setenv("LABPILOT_TEST_LATENCY", "20")
    out = tmp_path / "run"
    with running(_write(tmp_path, trials=2), out):
        first = until(lambda: [t for t in trials(out).values() if t.state == "running"], what="a running trial")[0]
        until(lambda: runs(journal), what="the run reaching the instrument")
        t0 = time.monotonic()
        assert main(["abandon", str(out), str(first.number), "--reason", "wrong vial"]) == 0
        until(lambda: trials(out)[first.number].state == "abandoned", timeout=10, what="the abandon")
        assert time.monotonic() - t0 < 10  # not the 20 s measurement
        t = trials(out)[first.number]
        assert "wrong vial" in t.reason and t.events[-1].actor == "operator"
        stop = [d for n, d in Ledger(sqlite_url(out)).documents(t.id) if n == "stop"]
        assert stop and stop[0]["exit_status"] == "abort"  # the bluesky run itself was aborted
        monkeypatch.setenv("LABPILOT_TEST_LATENCY", "0.1")
        assert main(["requeue", str(out), str(first.number)]) == 0
        again = until(lambda: [t for t in trials(out).values() if t.source == f"requeue of trial {first.number}"],
                      what="the re-queued trial")[0]
        assert again.parameters == first.parameters and again.number != first.number
        assert main(["requeue", str(out), str(again.number)]) == 2  # not abandoned or failed
        assert main(["abandon", str(out), "999"]) == 2  # no such trial


def test_commands_to_a_stopped_campaign_apply_when_it_resumes(tmp_path, journal, capsys):
    path, out = _write(tmp_path, trials=2, approval="{policy: manual}"), tmp_path / "run"
    with running(path, out) as run:
        first = until(lambda: waiting(out), what="a proposal waiting")[0]
        assert main(["stop", str(out)]) == 0
        run.join()
    assert Ledger(sqlite_url(out)).campaign().status == "stopped"
    assert main(["stop", str(out)]) == 2  # not running: nothing to stop
    capsys.readouterr()
    assert main(["approve", str(out), str(first.number)]) == 0
    assert "applies when the campaign resumes" in capsys.readouterr().out
    assert main(["budget", str(out), "--max-trials", "1"]) == 0
    assert runs(journal) == []  # nothing ran while it was stopped
    assert trials(out)[first.number].state == "proposed"
    run = Running(path, out)  # `labpilot run FILE` again
    run.join()
    assert trials(out)[first.number].state == "completed"
    assert runs(journal) == [(first.parameters["x1"], first.parameters["x2"])]
    assert run.result.status == "finished"  # the operator's budget of one trial, kept on resume
    assert [c.status for c in audit(out) if c.action in ("approve", "budget")] == ["applied", "applied"]


def test_approval_timeout_rejects_and_is_not_learnt_as_a_failure(tmp_path, journal):
    out = tmp_path / "run"
    with running(_write(tmp_path, trials=2, approval="{policy: manual, timeout: 0.5}"), out):
        until(lambda: [t for t in trials(out).values() if t.state == "rejected"], what="a timed-out proposal")
    t = next(t for t in trials(out).values() if t.state == "rejected")
    assert t.reason.startswith("approval timed out") and t.events[-1].actor == "system"
    ledger = Ledger(sqlite_url(out))
    assert t.number not in [k for k, _ in ledger.numbered_history(ledger.campaign().id)]
    assert runs(journal) == []


def test_rules_policy_holds_only_matching_proposals_and_keeps_the_station_busy(tmp_path, journal):
    out = tmp_path / "run"
    with running(_write(tmp_path, trials=6, approval="{policy: rules, rules: ['x2 > 7.5']}"), out):
        until(lambda: len(runs(journal)) >= 3 and waiting(out), timeout=40, what="runs beside a waiting proposal")
        for t in waiting(out):
            assert t.parameters["x2"] > 7.5 and "x2 > 7.5" in t.awaiting
    for _x1, x2 in runs(journal):
        assert x2 <= 7.5  # nothing that matched the rule ran without a person


def test_a_person_measures_trials_told_from_the_command_line(tmp_path, capsys):
    path, out = _write(tmp_path, trials=3, instrument=PERSON), tmp_path / "run"
    with running(path, out) as run:
        first = until(lambda: [t for t in trials(out).values() if t.state == "running"], what="a trial to measure")[0]
        capsys.readouterr()
        assert main(["suggest", str(out)]) == 0
        said = capsys.readouterr().out
        assert f"trial {first.number}" in said and "labpilot tell" in said
        assert main(["tell", str(out), str(first.number), "z=1"]) == 2  # the chemist measures y
        assert main(["tell", str(out), str(first.number), "y=3.25"]) == 0
        until(lambda: trials(out)[first.number].state == "completed", what="the told result")
        assert trials(out)[first.number].observation.values == {"y": 3.25}
        second = until(lambda: [t for t in trials(out).values() if t.state == "running"], what="the next")[0]
        assert main(["tell", str(out), str(second.number), "--failed", "the flask cracked"]) == 0
        until(lambda: trials(out)[second.number].state == "failed", what="the failure")
        assert "the flask cracked" in trials(out)[second.number].reason
        third = until(lambda: [t for t in trials(out).values() if t.state == "running"], what="the third")[0]
        assert main(["stop", str(out)]) == 0
        run.join()
    # stopped while the person measured: the trial stays theirs, and is told after a resume
    assert trials(out)[third.number].state == "running"
    assert main(["tell", str(out), str(third.number), "y=7"]) == 0  # queued
    run = Running(path, out)
    run.join()
    assert trials(out)[third.number].state == "completed"
    assert trials(out)[third.number].observation.values == {"y": 7.0}
    ledger = Ledger(sqlite_url(out))
    docs = [n for n, _ in ledger.documents(trials(out)[third.number].id)]
    assert docs.count("event") == 1  # the told result is an event of a bluesky run, like any other


def test_import_adds_checked_rows_and_names_every_bad_one(tmp_path, journal, capsys):
    path, out = _write(tmp_path, trials=1), tmp_path / "run"
    with running(path, out) as run:
        run.join()
    good = tmp_path / "past.csv"
    good.write_text("x1,x2,y\n1.0,2.0,30.5\n-3,12,8.25\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("x1,x2,y\n1.0,2.0,30.5\n99,2,1\n1,2,nan\nwater,2,1\n")
    before = len(trials(out))
    assert main(["import", str(out), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "line 4" in err and "line 5" in err and "line 2" not in err
    assert len(trials(out)) == before  # nothing imported
    assert main(["import", str(out), str(tmp_path / "missing.csv")]) == 2
    (tmp_path / "cols.csv").write_text("x1,y\n1,2\n")
    assert main(["import", str(out), str(tmp_path / "cols.csv")]) == 2
    assert "x2" in capsys.readouterr().err
    assert main(["import", str(out), str(good)]) == 0
    Running(path, out).join()  # applies on resume (and the budget, spent, ends it at once)
    imported = [t for t in trials(out).values() if (t.source or "").startswith("import from")]
    assert [(t.parameters, t.observation.values, t.state) for t in imported] == [
        ({"x1": 1.0, "x2": 2.0}, {"y": 30.5}, "completed"), ({"x1": -3.0, "x2": 12.0}, {"y": 8.25}, "completed")]
    assert all(t.events[0].actor == "operator" for t in imported)


def test_a_viewer_is_refused_and_the_refusal_is_audited(tmp_path, journal):
    path, out = _write(tmp_path, trials=1), tmp_path / "run"
    with running(path, out) as run:
        run.join()
    ledger = Ledger(sqlite_url(out))
    control = Control(ledger, ledger.campaign().id)
    with pytest.raises(Forbidden):
        control.submit("pause", Actor("vera", role="viewer", via="api"))
    with pytest.raises(ControlError, match="no trial 42|has no trial 42"):
        control.submit("approve", Actor("olga"), trial=42)
    rows = ledger.commands()
    assert [(r.user, r.status) for r in rows[:2]] == [("olga", "refused"), ("vera", "denied")]


def test_bad_approval_policies_are_refused_naming_the_field(tmp_path):
    path = _write(tmp_path, approval="{policy: rules, rules: ['pressure > 3']}")
    with pytest.raises(CampaignError) as err:
        load_campaign(path)
    assert any(i.path == "approval.rules[0]" and "pressure" in i.message for i in err.value.issues)
    for approval, words in [("{policy: rules}", "needs 'rules'"), ("{policy: manual, rules: ['x1 > 1']}", "policy 'rules'"),
                            ("{policy: rules, rules: ['x1 >> 1']}", "cannot read"), ("{policy: sometimes}", "policy"),
                            ("{policy: manual, timeout: -1}", "timeout")]:
        with pytest.raises(CampaignError) as err:
            load_campaign(_write(tmp_path, approval=approval))
        assert words in str(err.value) + " ".join(i.message + i.path for i in err.value.issues), approval


def test_out_of_domain_policy_waits_only_above_the_threshold():
    from orchestrator.approval import waits_because
    from orchestrator.spec import ApprovalSpec

    policy = ApprovalSpec(policy="out_of_domain", threshold=1.5)
    assert waits_because(policy, {"x": 1}, ood=0.4) is None
    assert "above the threshold" in waits_because(policy, {"x": 1}, ood=2.0)
    assert waits_because(policy, {"x": 1}, ood=None) is not None  # no model yet: a person decides
    rules = ApprovalSpec(policy="rules", rules=["solvent == DMSO", "sd.yield > 5"])
    assert waits_because(rules, {"solvent": "DMSO"}, sd={"yield": 1}) is not None
    assert waits_because(rules, {"solvent": "water"}, sd={"yield": 1}) is None
    assert waits_because(rules, {"solvent": "water"}, sd={"yield": 9}) is not None


def test_suggest_and_tell_name_what_is_wrong(tmp_path, capsys):
    assert main(["suggest", str(tmp_path / "nowhere")]) == 2
    assert main(["pause", str(tmp_path / "nowhere")]) == 2
    assert "ledger" in capsys.readouterr().err


def test_the_api_steers_a_running_campaign_like_the_command_line(tmp_path, journal, monkeypatch):
    from fastapi.testclient import TestClient

    from orchestrator.console import create_app
    from orchestrator.console.auth import new_token, token_hash

    out = tmp_path / "run"
    with running(_write(tmp_path, trials=3, approval="{policy: manual}"), out) as run:
        ledger = run.runtime.ledger
        ledger.add_user("olga", "operator", None)
        ledger.add_user("vera", "viewer", None)
        tokens = {name: new_token() for name in ("olga", "vera")}
        for name, token in tokens.items():
            ledger.add_token(name, token_hash(token))
        client = TestClient(create_app([ledger], ledger, auth_required=True, live_source="listeners"))
        as_olga = {"Authorization": f"Bearer {tokens['olga']}"}
        cid = f"0-{run.runtime.campaign_id}"
        first = until(lambda: waiting(out), what="a proposal waiting")[0]
        listed = client.get(f"/api/campaigns/{cid}/waiting", headers=as_olga)
        assert [p["trial"] for p in listed.json()] == [first.number]
        refused = client.post(f"/api/campaigns/{cid}/trials/{first.number}/approve",
                              headers={"Authorization": f"Bearer {tokens['vera']}"})
        assert refused.status_code == 403 and runs(journal) == []
        monkeypatch.setenv("LABPILOT_TEST_LATENCY", "20")  # the next run is long: abandoned below
        r = client.post(f"/api/campaigns/{cid}/trials/{first.number}/approve", headers=as_olga,
                        json={"reason": "fine"})
        assert r.status_code == 200 and r.json()["status"] == "applied", r.json()
        until(lambda: runs(journal), what="the approved run reaching the instrument")
        r = client.post(f"/api/campaigns/{cid}/trials/{first.number}/abandon", headers=as_olga, json={})
        assert r.status_code == 200, r.json()
        until(lambda: trials(out)[first.number].state == "abandoned", timeout=10, what="the abandon")
        monkeypatch.setenv("LABPILOT_TEST_LATENCY", "0.1")
        r = client.post(f"/api/campaigns/{cid}/trials/{first.number}/requeue", headers=as_olga, json={})
        assert r.status_code == 200, r.json()
        requeued = until(lambda: [t for t in trials(out).values()
                                  if t.source == f"requeue of trial {first.number}" and t.state == "completed"],
                         what="the re-queued trial completing")[0]
        assert requeued.parameters == first.parameters
        r = client.post(f"/api/campaigns/{cid}/trials/{first.number}/approve", headers=as_olga, json={})
        assert r.status_code == 409 and "not waiting" in r.json()["error"]
        r = client.post(f"/api/campaigns/{cid}/pause", headers=as_olga, json={})
        assert r.status_code == 200 and ledger.campaign(run.runtime.campaign_id).paused is True
    actions = [(c.user, c.action, c.status) for c in reversed(ledger.commands()) if c.via == "api"]
    assert actions[:5] == [("vera", "approve", "denied"), ("olga", "approve", "applied"),
                           ("olga", "abandon", "applied"), ("olga", "requeue", "applied"),
                           ("olga", "approve", "refused")]


def test_an_operators_own_point_runs_and_one_outside_the_envelope_is_vetoed(tmp_path, journal, capsys):
    out = tmp_path / "run"
    with running(_write(tmp_path, trials=3, approval="{policy: manual}"), out) as run:
        until(lambda: waiting(out), what="a proposal waiting")
        assert main(["add", str(out), "x1=8", "x2=1"]) == 2  # x1 <= 5 in the envelope
        assert "vetoed" in capsys.readouterr().err
        assert main(["add", str(out), "x1=11", "x2=1"]) == 2  # outside the search space: refused at once
        assert main(["add", str(out), "x1=2"]) == 2  # every parameter, please
        assert main(["add", str(out), "x1=2.5", "x2=3", "--reason", "the chemist's hunch"]) == 0
        mine = until(lambda: [t for t in trials(out).values() if (t.source or "").startswith("added by")
                              and t.state == "completed"], what="the operator's trial completing")[0]
        assert mine.parameters == {"x1": 2.5, "x2": 3.0} and mine.proposal.planner == "operator"
        assert [(e.to_state, e.actor) for e in mine.events][:2] == [("proposed", "operator"), ("approved", "operator")]
        assert main(["budget", str(out), "--max-trials", "1"]) == 0
        run.join()
    assert runs(journal) == [(2.5, 3.0)]  # the vetoed point never reached the instrument
    vetoed = [t for t in trials(out).values() if t.state == "vetoed"]
    assert [t.parameters["x1"] for t in vetoed] == [8.0]


def test_hold_instrument_keeps_the_station_idle_for_a_waiting_proposal(tmp_path, journal):
    out = tmp_path / "run"
    approval = "{policy: rules, rules: ['x2 > 7.5'], hold_instrument: true}"
    with running(_write(tmp_path, trials=8, approval=approval), out):
        until(lambda: waiting(out), timeout=40, what="a proposal waiting")
        ran = len(runs(journal))
        time.sleep(1.5)
        assert len(runs(journal)) == ran  # the one station is held for the waiting proposal
        assert len(waiting(out)) == 1


def test_the_summary_of_a_campaign_on_hardware_or_a_person_claims_no_known_optimum(tmp_path):
    """`labpilot run` ended with "ProblemError: give exactly one of 'simulator' or 'dataset'" after
    the last trial of an epics or manual campaign: it looked for a simulator's known optimum."""
    from orchestrator.cli import _known_optimum

    assert _known_optimum(load_campaign(_write(tmp_path, instrument=PERSON))) == {}
    assert _known_optimum(load_campaign(_write(tmp_path, instrument=REACTOR))) == {}
    assert "y" in _known_optimum(load_campaign(_write(tmp_path, instrument="{name: sim, simulator: branin}")))
