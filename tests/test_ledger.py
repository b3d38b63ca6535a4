"""The ledger: the trial lifecycle is enforced, every state change is recorded with who and why,
and what is written survives reopening the SQLite file (in WAL mode)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestrator.ledger import FINAL_STATES, TRANSITIONS, IllegalTransition, Ledger, sqlite_url
from planners.base import HistoryItem, Proposal


@pytest.fixture
def ledger(tmp_path):
    led = Ledger.for_directory(tmp_path)
    yield led
    led.close()


@pytest.fixture
def campaign(ledger):
    campaign_id, resumed = ledger.open_campaign("ledger-test", {"name": "ledger-test"}, seed=3)
    assert resumed is False
    return campaign_id


def _propose(ledger: Ledger, campaign_id: int, **params) -> int:
    return ledger.propose(campaign_id, Proposal(parameters=params or {"x1": 0.5, "x2": 1.5},
                                                planner="sobol", seed=3))


def _run_to(ledger: Ledger, trial_id: int, state: str) -> None:
    """Drive a proposed trial along the legal path to ``state``."""
    path = {
        "proposed": [],
        "approved": ["approved"],
        "running": ["approved", "running"],
        "completed": ["approved", "running", "completed"],
        "failed": ["approved", "running", "failed"],
        "vetoed": ["vetoed"],
        "abandoned": ["abandoned"],
        "rejected": ["rejected"],
    }[state]
    for s in path:
        ledger.transition(trial_id, s, "system", f"to {s}")


def _state(ledger: Ledger, campaign_id: int, trial_id: int) -> str:
    return next(t.state for t in ledger.trials(campaign_id) if t.id == trial_id)


def _events(db: Path, trial_id: int) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT from_state, to_state, actor, reason FROM trial_events WHERE trial_id = ? ORDER BY id",
            (trial_id,),
        ).fetchall()


# ---- the lifecycle ---------------------------------------------------------------------
def test_proposed_approved_running_completed_is_a_legal_path(ledger, campaign):
    trial = _propose(ledger, campaign)

    ledger.transition(trial, "approved", "system", "inside the envelope")
    assert _state(ledger, campaign, trial) == "approved"
    ledger.transition(trial, "running", "system", "started on reactor", instrument="reactor")
    assert _state(ledger, campaign, trial) == "running"
    ledger.complete(trial, {"y": 1.25}, run_uid="uid-1")

    (row,) = ledger.trials(campaign)
    assert row.state == "completed"
    assert row.instrument == "reactor"
    assert row.started_at is not None and row.finished_at is not None


def test_completed_trial_cannot_go_back_to_running(ledger, campaign):
    trial = _propose(ledger, campaign)
    _run_to(ledger, trial, "running")
    ledger.complete(trial, {"y": 1.0}, run_uid="uid-1")

    with pytest.raises(IllegalTransition, match="'completed' to 'running'"):
        ledger.transition(trial, "running", "operator", "rerun it")

    assert _state(ledger, campaign, trial) == "completed"


def test_proposed_trial_cannot_skip_to_completed(ledger, campaign):
    trial = _propose(ledger, campaign)

    with pytest.raises(IllegalTransition, match="'proposed' to 'completed'"):
        ledger.transition(trial, "completed", "system", "")
    with pytest.raises(IllegalTransition):
        ledger.complete(trial, {"y": 1.0}, run_uid="uid-1")

    (row,) = ledger.trials(campaign)
    assert row.state == "proposed"
    assert row.observation is None


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
def test_final_states_cannot_move_anywhere(ledger, campaign, final):
    trial = _propose(ledger, campaign)
    _run_to(ledger, trial, final)

    for target in TRANSITIONS:
        with pytest.raises(IllegalTransition, match="nowhere"):
            ledger.transition(trial, target, "operator", "try anyway")

    assert _state(ledger, campaign, trial) == final


def test_every_transition_the_table_forbids_raises_and_every_allowed_one_succeeds(tmp_path):
    # Exhaustive over (from, to): reach `from` legally in a fresh trial, then try `to`.
    with_paths = {"proposed", "approved", "running"}
    led = Ledger.for_directory(tmp_path)
    cid, _ = led.open_campaign("table", {}, seed=0)
    for origin in with_paths:
        for target in TRANSITIONS:
            trial = _propose(led, cid)
            _run_to(led, trial, origin)
            if target in TRANSITIONS[origin]:
                led.transition(trial, target, "system", "")
                assert _state(led, cid, trial) == target
            else:
                with pytest.raises(IllegalTransition):
                    led.transition(trial, target, "system", "")
                assert _state(led, cid, trial) == origin
    led.close()


def test_unknown_state_and_unknown_actor_are_refused(ledger, campaign):
    trial = _propose(ledger, campaign)

    with pytest.raises(ValueError, match="unknown state 'done'"):
        ledger.transition(trial, "done", "system", "")
    with pytest.raises(ValueError, match="unknown actor 'robot'"):
        ledger.transition(trial, "approved", "robot", "")

    assert _state(ledger, campaign, trial) == "proposed"


def test_transition_of_a_missing_trial_raises_lookup_error(ledger, campaign):
    with pytest.raises(LookupError, match="no trial with id 999"):
        ledger.transition(999, "approved", "system", "")


# ---- the audit trail -------------------------------------------------------------------
def test_every_state_change_is_an_event_row_with_actor_and_reason(tmp_path, ledger, campaign):
    trial = _propose(ledger, campaign)
    ledger.transition(trial, "approved", "operator", "looks safe")
    ledger.transition(trial, "running", "system", "started on reactor")
    ledger.transition(trial, "failed", "system", "pump fault")

    events = _events(tmp_path / "ledger.sqlite", trial)

    assert events == [
        (None, "proposed", "planner", "proposed by sobol"),
        ("proposed", "approved", "operator", "looks safe"),
        ("approved", "running", "system", "started on reactor"),
        ("running", "failed", "system", "pump fault"),
    ]
    (row,) = ledger.trials(campaign)
    assert [(e.from_state, e.to_state) for e in row.events] == [(e[0], e[1]) for e in events]
    assert row.reason == "pump fault"


def test_refused_transition_leaves_no_event_row(tmp_path, ledger, campaign):
    trial = _propose(ledger, campaign)

    with pytest.raises(IllegalTransition):
        ledger.transition(trial, "running", "system", "skip approval")

    assert [e[1] for e in _events(tmp_path / "ledger.sqlite", trial)] == ["proposed"]


def test_complete_stores_the_observation_and_run_uid(ledger, campaign):
    trial = _propose(ledger, campaign)
    _run_to(ledger, trial, "running")

    ledger.complete(trial, {"y": 2.5, "purity": 0.93}, run_uid="run-abc", units={"purity": "fraction"})

    (row,) = ledger.trials(campaign)
    assert row.state == "completed"
    assert row.run_uid == "run-abc"
    assert row.observation.values == {"y": 2.5, "purity": 0.93}
    assert row.observation.run_uid == "run-abc"
    assert row.observation.units == {"purity": "fraction"}
    assert row.events[-1].to_state == "completed"
    assert row.events[-1].actor == "system"


def test_proposal_records_the_planners_decision(ledger, campaign):
    trial = ledger.propose(campaign, Proposal(parameters={"x1": 1.0}, planner="bo", seed=17,
                                              predicted_mean={"y": 0.4}, predicted_sd={"y": 0.1},
                                              acquisition_value=float("nan"), model_version="gp-8"))

    (row,) = ledger.trials(campaign)
    assert row.id == trial and row.number == 1
    assert row.proposal.planner == "bo"
    assert row.proposal.seed == 17
    assert row.proposal.model_version == "gp-8"
    assert row.proposal.predicted_mean == {"y": 0.4}
    assert row.proposal.acquisition_value is None  # a non-finite value is not stored


def test_trials_are_numbered_from_one_in_proposal_order(ledger, campaign):
    ids = [_propose(ledger, campaign, x1=float(i)) for i in range(3)]

    rows = ledger.trials(campaign)

    assert [r.number for r in rows] == [1, 2, 3]
    assert [r.id for r in rows] == ids
    assert [r.parameters["x1"] for r in rows] == [0.0, 1.0, 2.0]


# ---- what planners and exports read ------------------------------------------------------
def test_history_has_completed_with_outcomes_failed_and_vetoed_as_failed_and_no_abandoned(
        ledger, campaign):
    done = _propose(ledger, campaign, x1=1.0)
    _run_to(ledger, done, "running")
    ledger.complete(done, {"y": 3.0}, run_uid="u1")
    failed = _propose(ledger, campaign, x1=2.0)
    _run_to(ledger, failed, "failed")
    vetoed = _propose(ledger, campaign, x1=3.0)
    _run_to(ledger, vetoed, "vetoed")
    abandoned = _propose(ledger, campaign, x1=4.0)
    _run_to(ledger, abandoned, "abandoned")
    _propose(ledger, campaign, x1=5.0)  # still proposed: not history either

    history = ledger.history(campaign)

    assert history == [
        HistoryItem({"x1": 1.0}, "completed", {"y": 3.0}),
        HistoryItem({"x1": 2.0}, "failed"),
        HistoryItem({"x1": 3.0}, "failed"),
    ]


def test_counts_tally_trials_by_state(ledger, campaign):
    for state in ("completed", "failed", "failed", "abandoned"):
        trial = _propose(ledger, campaign)
        _run_to(ledger, trial, state)
    _propose(ledger, campaign)

    counts = ledger.counts(campaign)

    assert counts["completed"] == 1
    assert counts["failed"] == 2
    assert counts["abandoned"] == 1
    assert counts["proposed"] == 1
    assert counts["running"] == 0


def test_trials_frame_has_one_row_per_trial_with_param_and_outcome_columns(ledger, campaign):
    done = _propose(ledger, campaign, x1=1.0, x2=2.0)
    _run_to(ledger, done, "running")
    ledger.complete(done, {"y": 7.5}, run_uid="u1")
    failed = _propose(ledger, campaign, x1=3.0, x2=4.0)
    _run_to(ledger, failed, "failed")
    _propose(ledger, campaign, x1=5.0, x2=6.0)

    frame = ledger.trials_frame(campaign)

    assert len(frame) == 3
    assert {"trial", "state", "param.x1", "param.x2", "outcome.y", "run_uid", "planner"} <= set(frame.columns)
    assert list(frame["trial"]) == [1, 2, 3]
    assert list(frame["state"]) == ["completed", "failed", "proposed"]
    assert list(frame["param.x1"]) == [1.0, 3.0, 5.0]
    assert frame.loc[0, "outcome.y"] == 7.5
    assert frame["outcome.y"].iloc[1:].isna().all()
    assert frame.loc[0, "run_uid"] == "u1"


def test_trials_are_kept_per_campaign(ledger, campaign):
    other, _ = ledger.open_campaign("another", {}, seed=0)
    _propose(ledger, campaign)
    _propose(ledger, other)
    _propose(ledger, other)

    assert len(ledger.trials(campaign)) == 1
    assert [t.number for t in ledger.trials(other)] == [1, 2]


# ---- storage ---------------------------------------------------------------------------
def test_sqlite_file_uses_write_ahead_logging(tmp_path, ledger, campaign):
    _propose(ledger, campaign)

    with sqlite3.connect(tmp_path / "ledger.sqlite") as con:
        (mode,) = con.execute("PRAGMA journal_mode").fetchone()

    assert mode.lower() == "wal"


def test_ledger_reopened_from_the_same_file_sees_the_same_trials(tmp_path):
    first = Ledger(sqlite_url(tmp_path))
    cid, _ = first.open_campaign("durable", {"seed": 5}, seed=5)
    done = first.propose(cid, Proposal(parameters={"x1": 0.25}, planner="random", seed=5))
    for s in ("approved", "running"):
        first.transition(done, s, "system", s)
    first.complete(done, {"y": 0.5}, run_uid="uid-durable")
    pending = first.propose(cid, Proposal(parameters={"x1": 0.75}, planner="random", seed=5))
    first.transition(pending, "approved", "operator", "ok")
    first.close()

    second = Ledger(sqlite_url(tmp_path))
    cid2, resumed = second.open_campaign("durable", {"seed": 5}, seed=5)
    rows = second.trials(cid2)

    assert resumed is True and cid2 == cid
    assert [(r.number, r.state) for r in rows] == [(1, "completed"), (2, "approved")]
    assert rows[0].observation.values == {"y": 0.5}
    assert rows[0].run_uid == "uid-durable"
    assert [e.to_state for e in rows[1].events] == ["proposed", "approved"]
    assert second.history(cid2) == [HistoryItem({"x1": 0.25}, "completed", {"y": 0.5})]
    # the lifecycle carries on where it stopped
    second.transition(pending, "running", "system", "resumed")
    with pytest.raises(IllegalTransition):
        second.transition(done, "running", "system", "again")
    assert second.propose(cid2, Proposal(parameters={"x1": 0.1}, planner="random", seed=5))
    assert [r.number for r in second.trials(cid2)] == [1, 2, 3]
    second.close()


def test_campaign_finish_is_recorded(ledger, campaign):
    ledger.finish_campaign(campaign, "finished", "budget reached")

    row = ledger.campaign(campaign)

    assert row.status == "finished"
    assert row.stop_reason == "budget reached"
    assert row.finished_at is not None
    assert ledger.campaign().name == "ledger-test"


def test_empty_ledger_says_to_run_a_campaign_first(ledger):
    with pytest.raises(LookupError, match="labpilot run"):
        ledger.campaign()


def test_a_suspension_and_a_failed_read_attempt_are_recorded_told_and_shown_by_status(ledger, campaign):
    from datetime import UTC, datetime

    from orchestrator.cli import _instrument_lines

    heard = []
    ledger.listeners.append(lambda topic, body: heard.append((topic, body)))
    trial = _propose(ledger, campaign)
    _run_to(ledger, trial, "running")
    t0 = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)
    ledger.record_suspension(campaign, "ioc", "lt:temperature", "10 <= lt:temperature <= 80", 95.5, trial, t0)
    ledger.clear_suspension(campaign, "ioc", "lt:temperature", 20.0, t0.replace(second=7), resume_after=2)
    ledger.record_retry(campaign, trial, "ioc", "read of ioc", 1, 3, "ReadTimeoutError: lt:y", t0.replace(second=9))
    [row] = ledger.suspensions(campaign)
    assert (row.value, row.cleared_value, row.trial_id) == (95.5, 20.0, trial)
    assert (row.resumed_at.replace(tzinfo=UTC) - t0).total_seconds() == 9
    assert [(t, b.get("state"), b.get("attempt")) for t, b in heard if t in ("suspension", "retry")] == \
        [("suspension", "tripped", None), ("suspension", "cleared", None), ("retry", None, 1)]
    lines = "\n".join(_instrument_lines(ledger.suspensions(campaign), ledger.retries(campaign),
                                        {trial: 1}))
    assert "ioc: lt:temperature = 95.5 (allowed 10 <= lt:temperature <= 80) tripped at" in lines
    assert "during trial 1; back in range at" in lines and "(20), the run went on at" in lines
    assert "trial 1 on ioc: read of ioc, attempt 1 of 3, failed at" in lines and "ReadTimeoutError: lt:y" in lines
