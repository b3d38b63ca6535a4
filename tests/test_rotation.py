"""A station that keeps failing is taken out of rotation: its trials go to the others, the
ledger and the stream say so, a restart keeps it out, and it comes back when an operator
restores it (``labpilot restore``, the console); bad retire/restore commands are refused and
audited."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from orchestrator.cli import main
from orchestrator.flows import CampaignRuntime, run_campaign
from orchestrator.ledger import Ledger, sqlite_url
from orchestrator.spec import CampaignError, load_campaign
from orchestrator.stream import Subscriber
from tests.test_control import until

pytestmark = pytest.mark.usefixtures("prefect_api_url")

CAMPAIGN = """
name: rotation
seed: 3
parameters:
  - {{name: x1, type: float, lower: -5, upper: 10}}
  - {{name: x2, type: float, lower: 0, upper: 15}}
objectives: [{{name: y, goal: minimize}}]
budget: {{max_trials: {trials}, max_consecutive_failures: {streak}}}
planner: {{name: sobol}}
instruments:
  - {{name: {name}, device: 'tests.lab_factories:reactor_with_a_broken_station', outcomes: [y],
     concurrency: {stations}, timeout: 20, out_of_rotation_after: {after}}}
"""


@pytest.fixture
def broken(tmp_path, monkeypatch):
    """The file whose presence keeps station 2 broken (delete it to repair the station)."""
    path = tmp_path / "BROKEN"
    path.write_text("the line to reactor 2 is blocked\n")
    monkeypatch.setenv("LABPILOT_TEST_BROKEN", str(path))
    monkeypatch.setenv("LABPILOT_TEST_LATENCY", "0.2")
    return path


def _write(tmp_path: Path, trials: int, stations: int = 3, after: int | str = 2, streak: int = 2,
           name: str = "reactor") -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(CAMPAIGN.format(trials=trials, stations=stations, after=after, streak=streak, name=name))
    return path


class Session:
    """One `labpilot run` of the campaign in a thread, with a subscriber to its stream's
    ``station`` topic linked before anything is dispatched."""

    def __init__(self, path: Path, out: Path) -> None:
        self.runtime = CampaignRuntime(load_campaign(path), out)
        self.sub = Subscriber(self.runtime.stream.subscribe_address, topics=("station",))
        self.sub.wait_linked(self.runtime.stream.publisher)
        self.result, self.error, self.messages = None, None, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = run_campaign(self.runtime)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.drain()
            self.runtime.close()

    def drain(self) -> list:
        while (msg := self.sub.recv(timeout=0.05)) is not None:
            self.messages.append(msg.body)
        return self.messages

    def join(self, timeout: float = 60) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the campaign did not end"
        assert self.error is None, self.error
        self.sub.close()


def _ledger(out: Path) -> tuple[Ledger, int]:
    ledger = Ledger(sqlite_url(out))
    return ledger, ledger.campaign().id


def _started(ledger: Ledger, cid: int) -> list:
    return sorted((t for t in ledger.trials(cid) if t.started_at is not None), key=lambda t: t.started_at)


def _naive(at):  # noqa: ANN001, ANN202 - SQLite hands back naive UTC
    return at.replace(tzinfo=None)


def test_a_failing_station_is_taken_out_stays_out_on_restart_and_is_given_trials_once_restored(
        tmp_path, broken, capsys):
    out = tmp_path / "run"
    # max_consecutive_failures 2 for the campaign: the broken station's failures do not end it
    run = Session(_write(tmp_path, trials=9), out)
    run.join()
    assert run.result.status == "finished", run.result.reason
    ledger, cid = _ledger(out)
    on2 = [t for t in _started(ledger, cid) if t.instrument == "reactor-2"]
    assert [t.state for t in on2] == ["failed", "failed"]
    (event,) = ledger.station_events(cid)
    assert (event.station, event.in_rotation, event.actor) == ("reactor-2", False, "system")
    assert "2 trials failed in a row on reactor-2" in event.reason and "labpilot restore" in event.reason
    after = [t for t in _started(ledger, cid) if _naive(t.started_at) > _naive(event.at)]
    assert after and {t.instrument for t in after} <= {"reactor-1", "reactor-3"}
    assert all(t.state == "completed" for t in ledger.trials(cid) if t.instrument != "reactor-2")
    assert ledger.runs_done(cid) == 9
    assert [(m["station"], m["in_rotation"], m["actor"]) for m in run.messages] == [("reactor-2", False, "system")]
    assert main(["status", str(out)]) == 0
    assert "station reactor-2 is out of rotation" in " ".join(capsys.readouterr().out.split())

    # a restart keeps it out (the ledger says so), though it is still broken and untried
    run = Session(_write(tmp_path, trials=13), out)
    run.join()
    assert ledger.runs_done(cid) == 13
    assert [t.state for t in _started(ledger, cid) if t.instrument == "reactor-2"] == ["failed", "failed"]
    assert len(ledger.station_events(cid)) == 1

    # repaired; the operator brings it back (queued: the campaign is not running) and it works again
    broken.unlink()
    assert main(["restore", str(out), "reactor-2", "--reason", "line unblocked"]) == 0
    assert "queued" in capsys.readouterr().out
    run = Session(_write(tmp_path, trials=19), out)
    run.join()
    restored = ledger.station_events(cid)[-1]
    assert (restored.station, restored.in_rotation, restored.actor) == ("reactor-2", True, "operator")
    assert "line unblocked" in restored.reason and "@" in restored.user
    later = [t for t in _started(ledger, cid) if t.instrument == "reactor-2" and _naive(t.started_at) > _naive(restored.at)]
    assert later and all(t.state == "completed" for t in later)
    assert ledger.out_of_rotation(cid) == {}
    assert ("reactor-2", True, "operator") in [(m["station"], m["in_rotation"], m["actor"]) for m in run.messages]
    command = next(c for c in ledger.commands(cid) if c.action == "restore")
    assert (command.status, command.args) == ("applied", {"station": "reactor-2"})
    ledger.close()


def test_when_every_station_is_out_the_campaign_waits_until_an_operator_restores_one(tmp_path, broken, capsys):
    out = tmp_path / "run"
    # one station, and it is the broken one
    run = Session(_write(tmp_path, trials=4, stations=1, after=2, streak=5, name="reactor_2"), out)
    ledger, cid = _ledger(out)
    until(lambda: ledger.out_of_rotation(cid), what="the broken station taken out of rotation")
    time.sleep(1.0)  # it waits: nothing else is dispatched, and it does not end
    assert run.thread.is_alive() and ledger.campaign(cid).status == "running"
    assert [t.state for t in ledger.trials(cid) if t.started_at is not None] == ["failed", "failed"]
    assert "every station is now out of rotation" in ledger.out_of_rotation(cid)["reactor_2"].reason
    broken.unlink()
    assert main(["restore", str(out), "reactor_2"]) == 0
    assert "back in rotation" in capsys.readouterr().out
    run.join()
    assert run.result.status == "finished"
    assert [t.state for t in ledger.trials(cid) if t.started_at is not None] == ["failed", "failed",
                                                                                 "completed", "completed"]
    assert "every station is now out of rotation" in run.messages[0]["reason"]
    ledger.close()


def test_an_operator_takes_a_station_out_by_hand_and_bad_retire_or_restore_commands_are_refused(
        tmp_path, broken, capsys):
    from orchestrator.console import create_app
    from tests.console_factories import add_users

    broken.unlink()  # every station sound
    out = tmp_path / "run"
    Session(_write(tmp_path, trials=2, stations=2), out).join()
    ledger, cid = _ledger(out)
    tokens = add_users(ledger)
    app = create_app([ledger], ledger, auth_required=False, wait_seconds=1.0)
    ada = {"Authorization": f"Bearer {tokens['ada']}"}
    with TestClient(app) as client:
        url = "/api/campaigns/0-1/stations/{}/{}"
        r = client.post(url.format("reactor-7", "retire"), json={"reason": "x"}, headers=ada)
        assert r.status_code == 404 and "its stations are ['reactor-1', 'reactor-2']" in r.json()["error"]
        r = client.post(url.format("reactor-1", "restore"), json={}, headers=ada)
        assert r.status_code == 409 and "is in rotation" in r.json()["error"]
        r = client.post(url.format("reactor-1", "retire"), json={}, headers=ada)
        assert r.status_code == 409 and "needs a reason" in r.json()["error"]
        r = client.post(url.format("reactor-1", "retire"), json={"reason": "x"},
                        headers={"Authorization": f"Bearer {tokens['vic']}"})
        assert r.status_code == 403
        r = client.post(url.format("reactor-1", "retire"), json={"reason": "recalibration"}, headers=ada)
        assert r.status_code == 202 and r.json()["status"] == "pending"  # applies when it resumes
    assert main(["retire", str(out), "reactor-1", "--reason", "again"]) == 2
    assert "out of rotation already" in " ".join(capsys.readouterr().err.split())
    assert main(["restore", str(out), "reactor-9"]) == 2
    audit = [(c.action, c.status, c.args.get("station")) for c in reversed(ledger.commands(cid))]
    assert audit == [("retire", "refused", "reactor-7"), ("restore", "refused", "reactor-1"),
                     ("retire", "refused", "reactor-1"), ("retire", "denied", "reactor-1"),
                     ("retire", "pending", "reactor-1"), ("retire", "refused", "reactor-1"),
                     ("restore", "refused", "reactor-9")]
    assert ledger.station_events(cid) == []  # nothing refused changed anything
    Session(_write(tmp_path, trials=6, stations=2), out).join()
    (event,) = ledger.station_events(cid)
    assert (event.station, event.in_rotation, event.actor, event.user) == ("reactor-1", False, "operator", "ada")
    assert "recalibration" in event.reason
    assert {t.instrument for t in ledger.trials(cid) if t.number > 2} == {"reactor-2"}
    ledger.close()


@pytest.mark.parametrize("value,message", [
    ("0", "greater than or equal to 1"),
    ("12", "more than budget.max_consecutive_failures (10)"),
])
def test_out_of_rotation_after_is_checked_when_the_file_is_read(tmp_path, value, message):
    with pytest.raises(CampaignError) as info:
        load_campaign(_write(tmp_path, trials=3, stations=2, after=value, streak=10))
    text = str(info.value)
    assert "out_of_rotation_after" in text and message in text
