"""The ledger: the campaign's durable record, and its only source of truth (SQLAlchemy).

A SQLite file in write-ahead-log mode under the campaign directory by default;
any SQLAlchemy URL (PostgreSQL to scale) by configuration. Every change of a
trial's state is a row with its time, actor and reason, and the trial
lifecycle of DESIGN.md is enforced here: an illegal change is an error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from planners.base import HistoryItem, Proposal

log = logging.getLogger("labpilot.ledger")

STATES = ("proposed", "vetoed", "rejected", "approved", "running", "completed", "failed", "abandoned")
FINAL_STATES = frozenset({"vetoed", "rejected", "completed", "failed", "abandoned"})
TRANSITIONS: dict[str, frozenset[str]] = {
    # a person (or the approval timeout) rejects a proposal waiting for approval
    "proposed": frozenset({"vetoed", "rejected", "approved", "abandoned"}),
    "approved": frozenset({"running", "abandoned", "vetoed"}),  # every dispatch passes the gate
    "running": frozenset({"completed", "failed", "abandoned"}),
    "vetoed": frozenset(),
    "rejected": frozenset(),
    "completed": frozenset(),
    "failed": frozenset(),
    "abandoned": frozenset(),
}
ACTORS = ("planner", "operator", "system")
ROLES = ("viewer", "operator", "admin")
#: how the reason of a proposal rejected for want of an answer begins (it is not history)
APPROVAL_TIMEOUT = "approval timed out"
#: a command's life: written ``pending``, then ``applied`` or ``refused`` by the campaign (or
#: ``denied`` at the door: an attempt the caller's role does not allow, kept for the audit log)
COMMAND_STATES = ("pending", "applied", "refused", "denied")


class CampaignRefused(Exception):
    """This campaign cannot start here now (another process runs it; its file changed what it
    is); the message says what to do. Nothing recorded was changed."""


class IllegalTransition(ValueError):
    """A trial was asked to change state in a way the lifecycle does not allow."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class CampaignRow(Base):
    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="created")
    stop_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: wall time the campaign has run, all its sessions together (kept current while it runs)
    wall_seconds: Mapped[float | None] = mapped_column(Float, nullable=True, default=0.0)
    #: who runs it now (``host:pid:token``) and until when the lease holds unless renewed
    lock_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lock_expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: changes of the campaign file accepted on resume: ``[{"at", "changed": {field: [old, new]}}]``
    spec_changes: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    #: an operator paused it: it dispatches nothing new until resumed (kept across restarts)
    paused: Mapped[bool | None] = mapped_column(Boolean, nullable=True, default=False)
    #: the budget an operator set, and the file's budget it replaced (a file edited since wins)
    budget_override: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    #: where the running campaign's stream can be followed (its proxy's subscriber side)
    stream_address: Mapped[str | None] = mapped_column(String(200), nullable=True)


class TrialRow(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("campaign_id", "number", name="uq_trial_number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20), index=True)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    instrument: Mapped[str | None] = mapped_column(String(200), nullable=True)
    run_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: why a ``proposed`` trial waits for a person (the approval policy's words); None: it does not
    awaiting: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: when a waiting proposal is rejected for want of an answer
    wait_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: where the trial came from when not from the planner: ``operator``, ``requeue of 7``, a file
    source: Mapped[str | None] = mapped_column(Text, nullable=True)
    events: Mapped[list[TrialEventRow]] = relationship(back_populates="trial", order_by="TrialEventRow.id")
    observation: Mapped[ObservationRow | None] = relationship(back_populates="trial")
    proposal: Mapped[ProposalRow | None] = relationship(back_populates="trial")


class TrialEventRow(Base):
    __tablename__ = "trial_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(20), nullable=True)
    to_state: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text, default="")
    trial: Mapped[TrialRow] = relationship(back_populates="events")


class ObservationRow(Base):
    __tablename__ = "observations"
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id"), unique=True)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    units: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    run_uid: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    trial: Mapped[TrialRow] = relationship(back_populates="observation")


class SuspensionRow(Base):
    """An interlock (``suspend_when``) that held an instrument's run: the PV, its allowed range,
    the value that tripped it and when; when it was back in range (and the value then), and when
    the run went on (``resumed_at``: ``resume_after`` seconds later, as bluesky's suspender waits).
    ``trial_id`` is the trial running when it tripped (none when the instrument was idle: the
    next trial waits for it before it starts)."""

    __tablename__ = "suspensions"
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    trial_id: Mapped[int | None] = mapped_column(ForeignKey("trials.id"), nullable=True, index=True)
    instrument: Mapped[str] = mapped_column(String(200))
    pv: Mapped[str] = mapped_column(String(200))
    allowed: Mapped[str] = mapped_column(Text, default="")
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    tripped_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    cleared_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    cleared_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resumed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RetryRow(Base):
    """One failed attempt of a step a trial retries (a read of its results: never an acquisition):
    the step, the attempt's number of how many allowed, the error, and when."""

    __tablename__ = "retries"
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    trial_id: Mapped[int | None] = mapped_column(ForeignKey("trials.id"), nullable=True, index=True)
    instrument: Mapped[str] = mapped_column(String(200))
    step: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    attempts_allowed: Mapped[int] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ProposalRow(Base):
    """A planner's decision: what it proposed, what it predicted, and why."""

    __tablename__ = "proposals"
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id"), unique=True)
    planner: Mapped[str] = mapped_column(String(50))
    seed: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str | None] = mapped_column(String(100), nullable=True)
    predicted_mean: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    predicted_sd: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    acquisition_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: results the model version had not yet been trained on when it made this proposal
    model_unseen: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: distance from the data the model has seen (1 ~ the typical spacing of that data)
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: what the planner's next ask starts from (``Proposal.model_state``: e.g. GP hyperparameters)
    model_state: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    #: what the planner was given: ``history`` and ``pending`` (trial numbers, in the order
    #: passed), ``state_from`` (the trial whose model_state it started from), ``n`` asked for
    #: and this proposal's ``index`` among them; enough to replay the decision exactly
    inputs: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    #: the parameters as the planner proposed them (an operator may edit the trial's before approving)
    parameters: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    trial: Mapped[TrialRow] = relationship(back_populates="proposal")


class DocumentRow(Base):
    """An event-model document of a trial's run, written as the RunEngine emits it: the stop
    document is in the ledger before the run returns, so a crash after the measurement and
    before the outcome was recorded still leaves the result (and recovery completes the trial)."""

    __tablename__ = "documents"
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id"), index=True)
    name: Mapped[str] = mapped_column(String(20))
    doc: Mapped[dict[str, Any]] = mapped_column(JSON)


class ModelVersionRow(Base):
    """One surrogate model version: what it was trained on, how well, and where it is saved."""

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))
    n_points: Mapped[int] = mapped_column(Integer)
    data_hash: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    calibration: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    inflation: Mapped[float] = mapped_column(Float, default=1.0)
    path: Mapped[str] = mapped_column(Text)
    record: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CommandRow(Base):
    """An operator's command (pause, approve, ...): written first, then carried out by the running
    campaign, which records the outcome. The audit log: who asked what, when, why, and what came
    of it, refused attempts included."""

    __tablename__ = "commands"
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id"), index=True, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(20))
    via: Mapped[str] = mapped_column(String(20))  # cli, api, console
    action: Mapped[str] = mapped_column(String(30))
    trial_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(20), index=True, default="pending")
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    outcome: Mapped[str] = mapped_column(Text, default="")


class TrialStepRow(Base):
    """One step of a trial that runs through several instruments in turn (a reactor makes the
    sample, a characterisation station measures it): which station, the parameters it was sent,
    when, and what came of it. Written ``running`` before the step's run starts and finished after,
    so a resumed campaign continues a trial at its next step and never reruns a finished one."""

    __tablename__ = "trial_steps"
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)  # 0, 1, ... in the campaign file's order of instruments
    station: Mapped[str] = mapped_column(String(200))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(20))  # running, completed, failed, abandoned
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    run_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class StationEventRow(Base):
    """A station taken out of rotation or brought back: by the system (it failed
    ``out_of_rotation_after`` trials in a row) or an operator (``labpilot retire``/``restore``).
    A station's latest row says where it stands, so the state outlives a restart."""

    __tablename__ = "station_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    station: Mapped[str] = mapped_column(String(200))
    in_rotation: Mapped[bool] = mapped_column(Boolean)
    actor: Mapped[str] = mapped_column(String(20))  # system or operator
    user: Mapped[str | None] = mapped_column(String(100), nullable=True)  # the operator, by name
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UserRow(Base):
    """A person who may use the console: a role, and a password hash (argon2), never the password."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class TokenRow(Base):
    """An API token for scripts: its SHA-256 (the token itself is shown once, at creation)."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


# Columns added after a ledger format was first released: (table, column, SQL type).
_ADDED_COLUMNS = (("proposals", "model_unseen", "INTEGER"), ("proposals", "ood_score", "FLOAT"),
                  ("proposals", "model_state", "JSON"), ("proposals", "inputs", "JSON"),
                  ("campaigns", "wall_seconds", "FLOAT"), ("campaigns", "lock_owner", "VARCHAR(200)"),
                  ("campaigns", "lock_expires", "TIMESTAMP"), ("campaigns", "spec_changes", "JSON"),
                  ("campaigns", "paused", "BOOLEAN"), ("campaigns", "budget_override", "JSON"),
                  ("campaigns", "stream_address", "VARCHAR(200)"), ("trials", "awaiting", "TEXT"),
                  ("trials", "wait_deadline", "TIMESTAMP"), ("trials", "source", "TEXT"),
                  ("proposals", "parameters", "JSON"))


def sqlite_url(directory: str | Path) -> str:
    return f"sqlite:///{Path(directory).resolve() / 'ledger.sqlite'}"


class Ledger:
    """Durable record of campaigns and their trials; safe to share between threads."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # noqa: ANN001
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        self._create_tables()
        self._add_missing_columns()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite allows one writer; serialising our own writes avoids busy retries.
        self._write_lock = threading.RLock()
        #: ``listener(topic, body)`` is told of every change *after* it is committed (the stream
        #: publishes these); a listener that fails is logged and never undoes the record.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def _notify(self, topic: str, body: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(topic, body)
            except Exception:  # noqa: BLE001 - the record is safe; only the news is lost
                log.exception("ledger: a listener failed on %s", topic)

    def _create_tables(self) -> None:
        """Create what is missing; another process creating the same tables at the same moment
        (two commands opening a new ledger) is not an error."""
        from sqlalchemy.exc import OperationalError, ProgrammingError

        for attempt in range(3):
            try:
                Base.metadata.create_all(self.engine)
                return
            except (OperationalError, ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(0.2)

    def _add_missing_columns(self) -> None:
        """Bring a ledger written by an earlier labpilot up to date (new nullable columns only)."""
        from sqlalchemy import inspect, text

        inspector = inspect(self.engine)
        with self.engine.begin() as conn:
            for table, column, sql_type in _ADDED_COLUMNS:
                if column not in {c["name"] for c in inspector.get_columns(table)}:
                    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))
            # a ledger from before trial numbers were unique per campaign
            if "uq_trial_number" not in {i["name"] for i in inspector.get_indexes("trials")} | \
                    {c["name"] for c in inspector.get_unique_constraints("trials")}:
                conn.execute(text("CREATE UNIQUE INDEX IF NOT EXISTS uq_trial_number ON trials (campaign_id, number)"))

    @classmethod
    def for_directory(cls, directory: str | Path, url: str | None = None) -> Ledger:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return cls(url or sqlite_url(directory))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_lock, self._sessions.begin() as session:
            yield session

    # ---- campaigns ----------------------------------------------------------
    def open_campaign(self, name: str, spec: dict[str, Any], seed: int) -> tuple[int, bool]:
        """The campaign's id, creating it if new (status ``created``); returns ``(id, resumed)``.
        An existing campaign is not changed: :meth:`mark_running` says when it really runs, so a
        start-up that fails leaves a finished campaign finished."""
        from sqlalchemy.exc import IntegrityError

        for _ in range(2):
            try:
                with self._write() as s:
                    row = s.scalar(select(CampaignRow).where(CampaignRow.name == name))
                    if row is not None:
                        return row.id, True
                    row = CampaignRow(name=name, spec=spec, seed=seed, status="created", wall_seconds=0.0)
                    s.add(row)
                    s.flush()
                    return row.id, False
            except IntegrityError:  # another process created it a moment ago: open that one
                continue
        raise RuntimeError(f"could not open campaign {name!r} in {self.url}")

    def mark_running(self, campaign_id: int) -> None:
        with self._write() as s:
            row = s.get(CampaignRow, campaign_id)
            assert row is not None
            row.status, row.stop_reason, row.finished_at = "running", None, None

    def accept_spec_change(self, campaign_id: int, spec: dict[str, Any], changed: dict[str, Any]) -> None:
        """Record a campaign file changed on resume in ways that are safe (budget, envelope, ...)."""
        with self._write() as s:
            row = s.get(CampaignRow, campaign_id)
            assert row is not None
            row.spec = spec
            row.spec_changes = [*(row.spec_changes or []), {"at": utcnow().isoformat(), "changed": changed}]

    def campaign(self, campaign_id: int | None = None) -> CampaignRow:
        with self._sessions() as s:
            q = select(CampaignRow)
            q = q.where(CampaignRow.id == campaign_id) if campaign_id else q.order_by(CampaignRow.id)
            row = s.scalars(q).first()
            if row is None:
                raise LookupError("the ledger holds no campaign; run one first with 'labpilot run FILE'")
            return row

    def campaigns(self) -> list[CampaignRow]:
        """Every campaign the ledger holds, oldest first (a shared store holds several)."""
        with self._sessions() as s:
            return list(s.scalars(select(CampaignRow).order_by(CampaignRow.id)))

    def campaign_by_name(self, name: str) -> CampaignRow:
        """The campaign called ``name``; ``LookupError`` naming the ones the ledger holds if none is."""
        with self._sessions() as s:
            row = s.scalar(select(CampaignRow).where(CampaignRow.name == name))
        if row is None:
            held = [c.name for c in self.campaigns()]
            raise LookupError(f"the ledger holds no campaign {name!r}; it holds {held or 'none'}")
        return row

    def finish_campaign(self, campaign_id: int, status: str, reason: str) -> None:
        with self._write() as s:
            row = s.get(CampaignRow, campaign_id)
            assert row is not None
            row.status, row.stop_reason, row.finished_at = status, reason, utcnow()

    # ---- trials -------------------------------------------------------------
    def propose(self, campaign_id: int, proposal: Proposal, inputs: dict[str, Any] | None = None,
                actor: str = "planner", source: str | None = None, reason: str | None = None) -> int:
        """Record a new trial in state ``proposed`` with the planner's decision (and ``inputs``,
        what the planner was given: see :attr:`ProposalRow.inputs`); return its id. An operator's
        own trial (added by hand, re-queued) has ``actor="operator"`` and says its ``source``."""
        with self._write() as s:
            number = (s.scalar(select(TrialRow.number).where(TrialRow.campaign_id == campaign_id)
                               .order_by(TrialRow.number.desc()).limit(1)) or 0) + 1
            trial = TrialRow(campaign_id=campaign_id, number=number, state="proposed",
                             parameters=_jsonable(proposal.parameters), source=source)
            s.add(trial)
            s.flush()
            s.add(ProposalRow(
                trial_id=trial.id, planner=proposal.planner, seed=proposal.seed,
                model_version=proposal.model_version, model_unseen=proposal.model_unseen,
                ood_score=_finite_or_none(proposal.ood_score),
                predicted_mean=_jsonable(proposal.predicted_mean),
                predicted_sd=_jsonable(proposal.predicted_sd),
                acquisition_value=_finite_or_none(proposal.acquisition_value),
                model_state=proposal.model_state, inputs=inputs,
                parameters=_jsonable(proposal.parameters),
            ))
            why = reason or f"proposed by {proposal.planner}"
            s.add(TrialEventRow(trial_id=trial.id, from_state=None, to_state="proposed",
                                actor=actor, reason=why))
            body = _trial_body(trial, None, actor, why)
        if self.listeners:
            self._notify("proposal", {**body, "planner": proposal.planner, "seed": proposal.seed,
                                      "model_version": proposal.model_version,
                                      "model_unseen": proposal.model_unseen,
                                      "ood_score": _finite_or_none(proposal.ood_score),
                                      "predicted_mean": _jsonable(proposal.predicted_mean),
                                      "predicted_sd": _jsonable(proposal.predicted_sd),
                                      "acquisition_value": _finite_or_none(proposal.acquisition_value)})
            self._notify("trial", body)
        return body["trial_id"]

    def transition(self, trial_id: int, to_state: str, actor: str, reason: str = "",
                   **fields: Any) -> None:
        """Move a trial to ``to_state``; raise ``IllegalTransition`` if the lifecycle forbids it."""
        if to_state not in STATES:
            raise ValueError(f"unknown state {to_state!r}; states are {STATES}")
        if actor not in ACTORS:
            raise ValueError(f"unknown actor {actor!r}; actors are {ACTORS}")
        with self._write() as s:
            before = s.get(TrialRow, trial_id)
            from_state = before.state if before is not None else None
            trial = self._transition(s, trial_id, to_state, actor, reason, **fields)
            body = _trial_body(trial, from_state, actor, reason) if self.listeners else {}
        if body:
            if to_state == "vetoed":
                self._notify("veto", body)
            self._notify("trial", body)

    def _transition(self, s: Session, trial_id: int, to_state: str, actor: str, reason: str,
                    **fields: Any) -> TrialRow:
        trial = s.get(TrialRow, trial_id)
        if trial is None:
            raise LookupError(f"no trial with id {trial_id}")
        if to_state not in TRANSITIONS[trial.state]:
            raise IllegalTransition(
                f"trial {trial.number} cannot go from {trial.state!r} to {to_state!r}; "
                f"from {trial.state!r} it may go to {sorted(TRANSITIONS[trial.state]) or 'nowhere (final)'}"
            )
        now = utcnow()
        s.add(TrialEventRow(trial_id=trial_id, from_state=trial.state, to_state=to_state, at=now,
                            actor=actor, reason=reason))
        trial.state = to_state
        if to_state == "running":
            trial.started_at = now
        if to_state in FINAL_STATES:
            trial.finished_at = now
            trial.reason = reason or None
        for k, v in fields.items():
            setattr(trial, k, v)
        return trial

    def complete(self, trial_id: int, values: dict[str, float], run_uid: str,
                 units: dict[str, str] | None = None, reason: str = "measured", actor: str = "system") -> None:
        """Record a trial's observation and mark it completed, in one transaction."""
        with self._write() as s:
            trial = self._transition(s, trial_id, "completed", actor, reason, run_uid=run_uid)
            s.add(ObservationRow(trial_id=trial_id, values=_jsonable(values), units=units or {},
                                 run_uid=run_uid))
            body = _trial_body(trial, "running", actor, reason) if self.listeners else {}
        if body:
            self._notify("trial", {**body, "outcomes": _jsonable(values), "units": units or {}})

    # ---- what happened on an instrument during a trial -----------------------------
    def record_suspension(self, campaign_id: int, instrument: str, pv: str, allowed: str,
                          value: float | None, trial_id: int | None, at: datetime | None = None) -> int:
        """An interlock tripped: note it (its clearing is :meth:`clear_suspension`)."""
        with self._write() as s:
            row = SuspensionRow(campaign_id=campaign_id, trial_id=trial_id, instrument=instrument, pv=pv,
                                allowed=allowed, value=_finite_or_none(value), tripped_at=at or utcnow())
            s.add(row)
            s.flush()
            body = _suspension_body(row, s.get(TrialRow, trial_id) if trial_id is not None else None)
        self._notify("suspension", body)
        return body["suspension_id"]

    def clear_suspension(self, campaign_id: int, instrument: str, pv: str, value: float | None,
                         at: datetime | None = None, resume_after: float = 0.0) -> int | None:
        """The interlock on ``pv`` of ``instrument`` is back in range: close its open suspension;
        the run goes on ``resume_after`` seconds later. Returns its id (``None``: none was open)."""
        at = at or utcnow()
        with self._write() as s:
            row = s.scalar(select(SuspensionRow).where(
                SuspensionRow.campaign_id == campaign_id, SuspensionRow.instrument == instrument,
                SuspensionRow.pv == pv, SuspensionRow.cleared_at.is_(None)).order_by(SuspensionRow.id.desc()).limit(1))
            if row is None:
                return None
            row.cleared_at, row.cleared_value = at, _finite_or_none(value)
            row.resumed_at = _later(at, resume_after)
            body = _suspension_body(row, s.get(TrialRow, row.trial_id) if row.trial_id is not None else None)
        self._notify("suspension", body)
        return body["suspension_id"]

    def suspensions(self, campaign_id: int) -> list[SuspensionRow]:
        with self._sessions() as s:
            return list(s.scalars(select(SuspensionRow).where(SuspensionRow.campaign_id == campaign_id)
                                  .order_by(SuspensionRow.id)))

    def record_retry(self, campaign_id: int, trial_id: int | None, instrument: str, step: str, attempt: int,
                     attempts_allowed: int, error: str, at: datetime | None = None) -> None:
        """A failed attempt of a retried step of a trial."""
        with self._write() as s:
            row = RetryRow(campaign_id=campaign_id, trial_id=trial_id, instrument=instrument, step=step,
                           attempt=attempt, attempts_allowed=attempts_allowed, error=error, at=at or utcnow())
            s.add(row)
            s.flush()
            trial = s.get(TrialRow, trial_id) if trial_id is not None else None
            body = {"campaign_id": campaign_id, "trial_id": trial_id, "number": trial.number if trial else None,
                    "instrument": instrument, "step": step, "attempt": attempt,
                    "attempts_allowed": attempts_allowed, "error": error, "at": row.at.timestamp()}
        self._notify("retry", body)

    def retries(self, campaign_id: int, trial_id: int | None = None) -> list[RetryRow]:
        with self._sessions() as s:
            q = select(RetryRow).where(RetryRow.campaign_id == campaign_id)
            if trial_id is not None:
                q = q.where(RetryRow.trial_id == trial_id)
            return list(s.scalars(q.order_by(RetryRow.id)))

    def record_import(self, campaign_id: int, parameters: dict[str, Any], values: dict[str, float],
                      source: str, reason: str) -> int:
        """A result measured outside the campaign (a file of past experiments) as a completed trial:
        the operator's, from ``source``; it never ran here, so it does not count against the budget."""
        with self._write() as s:
            number = (s.scalar(select(TrialRow.number).where(TrialRow.campaign_id == campaign_id)
                               .order_by(TrialRow.number.desc()).limit(1)) or 0) + 1
            now = utcnow()
            trial = TrialRow(campaign_id=campaign_id, number=number, state="completed", finished_at=now,
                             parameters=_jsonable(parameters), source=source, reason=reason, run_uid="")
            s.add(trial)
            s.flush()
            s.add(TrialEventRow(trial_id=trial.id, from_state=None, to_state="completed", at=now,
                                actor="operator", reason=reason))
            s.add(ObservationRow(trial_id=trial.id, values=_jsonable(values), units={}, run_uid=""))
            body = _trial_body(trial, None, "operator", reason)
        self._notify("trial", {**body, "outcomes": _jsonable(values), "units": {}})
        return body["trial_id"]

    def set_parameters(self, trial_id: int, parameters: dict[str, Any]) -> None:
        """An operator's edit of a waiting proposal (the planner's own stay on its proposal row)."""
        with self._write() as s:
            trial = s.get(TrialRow, trial_id)
            assert trial is not None and trial.state == "proposed", "only a waiting proposal is edited"
            trial.parameters = _jsonable(parameters)

    def set_awaiting(self, trial_id: int, why: str | None, deadline: datetime | None = None) -> None:
        """Mark a proposed trial as waiting for a person (``why``), or no longer waiting (``None``)."""
        with self._write() as s:
            trial = s.get(TrialRow, trial_id)
            assert trial is not None
            trial.awaiting, trial.wait_deadline = why, deadline
            body = _trial_body(trial, trial.state, "system", why or "") if self.listeners else {}
        if body and why:
            self._notify("trial", {**body, "awaiting": why})

    # ---- operator commands (orchestrator.control writes and applies them) ----------------
    def add_command(self, campaign_id: int | None, user: str, role: str, via: str, action: str,
                    trial_number: int | None = None, args: dict[str, Any] | None = None,
                    reason: str = "", status: str = "pending", outcome: str = "") -> CommandRow:
        assert status in COMMAND_STATES
        with self._write() as s:
            row = CommandRow(campaign_id=campaign_id, user=user, role=role, via=via, action=action,
                             trial_number=trial_number, args=_jsonable(args or {}), reason=reason,
                             status=status, outcome=outcome,
                             applied_at=None if status == "pending" else utcnow())
            s.add(row)
            s.flush()
        return row

    def pending_commands(self, campaign_id: int) -> list[CommandRow]:
        with self._sessions() as s:
            return list(s.scalars(select(CommandRow).where(CommandRow.campaign_id == campaign_id,
                                                           CommandRow.status == "pending")
                                  .order_by(CommandRow.id)))

    def has_pending_commands(self, campaign_id: int) -> bool:
        with self._sessions() as s:
            return s.scalar(select(CommandRow.id).where(CommandRow.campaign_id == campaign_id,
                                                        CommandRow.status == "pending").limit(1)) is not None

    def finish_command(self, command_id: int, status: str, outcome: str) -> CommandRow:
        """Record what came of a command (``applied`` or ``refused``, and in words), once."""
        assert status in ("applied", "refused")
        with self._write() as s:
            row = s.get(CommandRow, command_id)
            assert row is not None
            if row.status == "pending":
                row.status, row.outcome, row.applied_at = status, outcome, utcnow()
        self._notify("command", _command_body(row))
        return row

    def command(self, command_id: int) -> CommandRow:
        with self._sessions() as s:
            row = s.get(CommandRow, command_id)
            if row is None:
                raise LookupError(f"no command with id {command_id}")
            return row

    def commands(self, campaign_id: int | None = None, limit: int = 100, offset: int = 0) -> list[CommandRow]:
        """The audit log, newest first (every campaign's, or one's)."""
        with self._sessions() as s:
            q = select(CommandRow).order_by(CommandRow.id.desc()).limit(limit).offset(offset)
            if campaign_id is not None:
                q = q.where(CommandRow.campaign_id == campaign_id)
            return list(s.scalars(q))

    def update_campaign(self, campaign_id: int, **fields: Any) -> None:
        """Set the campaign's control fields (``paused``, ``budget_override``, ``stream_address``)."""
        assert set(fields) <= {"paused", "budget_override", "stream_address", "spec"}, fields
        with self._write() as s:
            row = s.get(CampaignRow, campaign_id)
            assert row is not None
            for k, v in fields.items():
                setattr(row, k, v)

    # ---- steps of a trial (instruments in turn) ------------------------------------------
    def start_step(self, trial_id: int, step: int, station: str, parameters: dict[str, Any]) -> int:
        """Record that step ``step`` of a trial starts on ``station`` (before its run starts)."""
        with self._write() as s:
            row = TrialStepRow(trial_id=trial_id, step=step, station=station, parameters=_jsonable(parameters),
                               state="running")
            s.add(row)
            s.flush()
            return row.id

    def finish_step(self, step_id: int, state: str, values: dict[str, float] | None = None,
                    run_uid: str | None = None, reason: str = "") -> None:
        assert state in ("completed", "failed", "abandoned"), state
        with self._write() as s:
            row = s.get(TrialStepRow, step_id)
            assert row is not None and row.state == "running", "a step is finished once"
            row.state, row.values, row.run_uid = state, _jsonable(values or {}), run_uid
            row.reason, row.finished_at = reason, utcnow()

    def steps(self, trial_id: int) -> list[TrialStepRow]:
        """The trial's steps, in the order they started."""
        with self._sessions() as s:
            return list(s.scalars(select(TrialStepRow).where(TrialStepRow.trial_id == trial_id)
                                  .order_by(TrialStepRow.id)))

    def campaign_steps(self, campaign_id: int) -> list[TrialStepRow]:
        """Every step of the campaign's trials, in the order they started."""
        with self._sessions() as s:
            return list(s.scalars(select(TrialStepRow).join(TrialRow, TrialRow.id == TrialStepRow.trial_id)
                                  .where(TrialRow.campaign_id == campaign_id).order_by(TrialStepRow.id)))

    # ---- stations in and out of rotation ------------------------------------------------
    def set_rotation(self, campaign_id: int, station: str, in_rotation: bool, actor: str, reason: str,
                     user: str | None = None) -> StationEventRow:
        """Record that ``station`` is out of rotation (or back in), then tell listeners (the
        ``station`` topic of the stream, which the console relays)."""
        assert actor in ACTORS, actor
        with self._write() as s:
            row = StationEventRow(campaign_id=campaign_id, station=station, in_rotation=in_rotation,
                                  actor=actor, user=user, reason=reason)
            s.add(row)
            s.flush()
        self._notify("station", {"campaign_id": campaign_id, "station": station, "in_rotation": in_rotation,
                                 "actor": actor, "user": user, "reason": reason, "at": row.at.timestamp()})
        return row

    def station_events(self, campaign_id: int) -> list[StationEventRow]:
        """Every station's changes of rotation, oldest first."""
        with self._sessions() as s:
            return list(s.scalars(select(StationEventRow).where(StationEventRow.campaign_id == campaign_id)
                                  .order_by(StationEventRow.id)))

    def out_of_rotation(self, campaign_id: int) -> dict[str, StationEventRow]:
        """The stations out of rotation now: station -> the event that took it out."""
        latest = {e.station: e for e in self.station_events(campaign_id)}
        return {k: e for k, e in latest.items() if not e.in_rotation}

    # ---- users and tokens (the console's accounts) ------------------------------------
    def add_user(self, name: str, role: str, password_hash: str | None) -> UserRow:
        from sqlalchemy.exc import IntegrityError

        assert role in ROLES
        try:
            with self._write() as s:
                row = UserRow(name=name, role=role, password_hash=password_hash)
                s.add(row)
                s.flush()
                return row
        except IntegrityError:
            raise ValueError(f"a user {name!r} exists already; pick another name") from None

    def update_user(self, name: str, **fields: Any) -> UserRow:
        assert set(fields) <= {"role", "password_hash", "disabled"}, fields
        with self._write() as s:
            row = s.scalar(select(UserRow).where(UserRow.name == name))
            if row is None:
                raise LookupError(f"no user {name!r}")
            for k, v in fields.items():
                setattr(row, k, v)
            return row

    def user(self, name: str) -> UserRow | None:
        with self._sessions() as s:
            return s.scalar(select(UserRow).where(UserRow.name == name))

    def users(self) -> list[UserRow]:
        with self._sessions() as s:
            return list(s.scalars(select(UserRow).order_by(UserRow.id)))

    def add_token(self, user_name: str, token_hash: str, label: str = "") -> TokenRow:
        user = self.user(user_name)
        if user is None:
            raise LookupError(f"no user {user_name!r}; add one with 'labpilot user add'")
        with self._write() as s:
            row = TokenRow(user_id=user.id, token_hash=token_hash, label=label)
            s.add(row)
            s.flush()
            return row

    def user_by_token(self, token_hash: str) -> UserRow | None:
        with self._sessions() as s:
            return s.scalar(select(UserRow).join(TokenRow, TokenRow.user_id == UserRow.id).where(
                TokenRow.token_hash == token_hash, TokenRow.revoked.is_(False), UserRow.disabled.is_(False)))

    # ---- surrogate models -----------------------------------------------------
    def record_model_version(self, campaign_id: int, record: dict[str, Any]) -> None:
        """Record a surrogate model version (``ModelVersion.record()``), then tell listeners."""
        record = _jsonable(record)
        with self._write() as s:
            s.add(ModelVersionRow(
                campaign_id=campaign_id, number=record["number"], label=record["label"],
                kind=record["kind"], n_points=record["n_points"], data_hash=record["data_hash"],
                metrics=record.get("metrics", {}), calibration=record.get("calibration", {}),
                inflation=float(record.get("inflation", 1.0)), path=record["path"], record=record,
            ))
        self._notify("model", {"campaign_id": campaign_id, **record})

    def model_versions(self, campaign_id: int) -> list[ModelVersionRow]:
        with self._sessions() as s:
            return list(s.scalars(select(ModelVersionRow).where(ModelVersionRow.campaign_id == campaign_id)
                                  .order_by(ModelVersionRow.number)))

    # ---- reading ------------------------------------------------------------
    def trials(self, campaign_id: int, states: tuple[str, ...] | None = None) -> list[TrialRow]:
        """The campaign's trials in order, with observation, proposal and events loaded."""
        with self._sessions() as s:
            q = (select(TrialRow).where(TrialRow.campaign_id == campaign_id).order_by(TrialRow.number)
                 .options(selectinload(TrialRow.observation), selectinload(TrialRow.proposal),
                          selectinload(TrialRow.events)))
            if states:
                q = q.where(TrialRow.state.in_(states))
            return list(s.scalars(q))

    def trial(self, trial_id: int) -> TrialRow:
        with self._sessions() as s:
            row = s.get(TrialRow, trial_id)
            if row is None:
                raise LookupError(f"no trial with id {trial_id}")
            _ = row.observation, row.proposal, row.events
            return row

    def trial_by_number(self, campaign_id: int, number: int) -> TrialRow | None:
        """The campaign's trial ``number`` (as people name trials), or ``None``."""
        with self._sessions() as s:
            tid = s.scalar(select(TrialRow.id).where(TrialRow.campaign_id == campaign_id, TrialRow.number == number))
        return None if tid is None else self.trial(tid)

    def latest_model_state(self, campaign_id: int) -> tuple[int | None, dict[str, Any] | None]:
        """``(trial number, model_state)`` of the campaign's newest proposal that carries a model
        state (what the planner's next ask starts from), or ``(None, None)``."""
        with self._sessions() as s:
            row = s.execute(
                select(TrialRow.number, ProposalRow.model_state).join(ProposalRow, ProposalRow.trial_id == TrialRow.id)
                .where(TrialRow.campaign_id == campaign_id, ProposalRow.model_state.is_not(None))
                .order_by(ProposalRow.id.desc()).limit(1)).first()
        return (None, None) if row is None else (int(row[0]), row[1])

    def history(self, campaign_id: int) -> list[HistoryItem]:
        """What a planner learns from: completed trials with outcomes, failed ones, and vetoed ones
        (as failures: the envelope forbids that point, so do not propose it again)."""
        return [h for _, h in self.numbered_history(campaign_id)]

    def numbered_history(self, campaign_id: int) -> list[tuple[int, HistoryItem]]:
        """:meth:`history` with each item's trial number, in the same order."""
        with self._sessions() as s:
            rows = s.scalars(
                select(TrialRow).where(TrialRow.campaign_id == campaign_id,
                                       TrialRow.state.in_(("completed", "failed", "vetoed", "rejected",
                                                           "abandoned")))
                .order_by(TrialRow.number).options(selectinload(TrialRow.observation))).all()
        return [(t.number, item) for t in rows if (item := history_item(t)) is not None]

    def runs_done(self, campaign_id: int) -> int:
        """Trials that reached an instrument and are over (completed, failed, or abandoned after
        they started): what the trial budget counts."""
        with self._sessions() as s:
            return int(s.scalar(select(func.count()).select_from(TrialRow).where(
                TrialRow.campaign_id == campaign_id, TrialRow.started_at.is_not(None),
                TrialRow.state.in_(("completed", "failed", "abandoned")))) or 0)

    # ---- run documents ----------------------------------------------------------
    def record_document(self, trial_id: int, name: str, doc: dict[str, Any]) -> None:
        with self._write() as s:
            s.add(DocumentRow(trial_id=trial_id, name=name, doc=_jsonable(doc)))

    def documents(self, trial_id: int) -> list[tuple[str, dict[str, Any]]]:
        """The trial's run documents in the order they were emitted."""
        with self._sessions() as s:
            rows = s.scalars(select(DocumentRow).where(DocumentRow.trial_id == trial_id)
                             .order_by(DocumentRow.id)).all()
        return [(r.name, r.doc) for r in rows]

    # ---- who runs the campaign ---------------------------------------------------
    def acquire(self, campaign_id: int, owner: str, lease_seconds: float,
                holder_is_dead: Callable[[str], bool] | None = None) -> str | None:
        """Take the campaign's lock for ``owner`` for ``lease_seconds``; ``None`` on success, else
        who holds it. A lease that expired, or whose holder ``holder_is_dead`` says is gone (a
        process on this host that no longer exists), is taken over. Works on any database: one
        conditional UPDATE decides."""
        from sqlalchemy import or_, update

        now = utcnow()
        with self._write() as s:
            row = s.get(CampaignRow, campaign_id)
            assert row is not None
            holder = row.lock_owner
            dead = holder is not None and holder_is_dead is not None and holder_is_dead(holder)
            cond = [CampaignRow.id == campaign_id]
            if not dead:
                cond.append(or_(CampaignRow.lock_owner.is_(None), CampaignRow.lock_owner == owner,
                                CampaignRow.lock_expires < now))
            else:
                cond.append(CampaignRow.lock_owner == holder)
            result = s.execute(update(CampaignRow).where(*cond).values(
                lock_owner=owner, lock_expires=_later(now, lease_seconds)).execution_options(
                synchronize_session=False))
            if result.rowcount == 1:
                return None
            s.expire_all()
            return s.get(CampaignRow, campaign_id).lock_owner or "another process"

    def renew(self, campaign_id: int, owner: str, lease_seconds: float, wall_seconds: float) -> bool:
        """Extend ``owner``'s lease and record the campaign's wall time so far; False if the lock
        was taken by someone else (the lease ran out)."""
        from sqlalchemy import update

        with self._write() as s:
            result = s.execute(update(CampaignRow).where(CampaignRow.id == campaign_id,
                                                         CampaignRow.lock_owner == owner)
                               .values(lock_expires=_later(utcnow(), lease_seconds),
                                       wall_seconds=wall_seconds)
                               .execution_options(synchronize_session=False))
            return result.rowcount == 1

    def release(self, campaign_id: int, owner: str) -> None:
        from sqlalchemy import update

        with self._write() as s:
            s.execute(update(CampaignRow).where(CampaignRow.id == campaign_id, CampaignRow.lock_owner == owner)
                      .values(lock_owner=None, lock_expires=None).execution_options(synchronize_session=False))

    def counts(self, campaign_id: int) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        with self._sessions() as s:
            q = (select(TrialRow.state, func.count()).where(TrialRow.campaign_id == campaign_id)
                 .group_by(TrialRow.state))
            for state, n in s.execute(q):
                counts[state] = n
        return counts

    def trials_frame(self, campaign_id: int) -> pd.DataFrame:
        """One row per trial: number, state, parameters, outcomes (each ``outcome.NAME`` followed by
        its units, ``unit.NAME``, where they are known), times, run uid, planner's prediction."""
        rows = []
        for t in self.trials(campaign_id):
            row: dict[str, Any] = {"trial": t.number, "state": t.state, "instrument": t.instrument}
            row.update({f"param.{k}": v for k, v in t.parameters.items()})
            if t.observation is not None:
                units = t.observation.units or {}
                for k, v in t.observation.values.items():
                    row[f"outcome.{k}"] = v
                    if units.get(k):
                        row[f"unit.{k}"] = units[k]
            if t.proposal is not None:
                row["planner"] = t.proposal.planner
                row["model_version"] = t.proposal.model_version
                row["model_unseen"] = t.proposal.model_unseen
                row["ood_score"] = t.proposal.ood_score
                row.update({f"predicted.{k}": v for k, v in t.proposal.predicted_mean.items()})
            row.update({"run_uid": t.run_uid, "reason": t.reason, "created_at": t.created_at,
                        "started_at": t.started_at, "finished_at": t.finished_at})
            rows.append(row)
        return pd.DataFrame(rows)


def history_item(t: TrialRow) -> HistoryItem | None:
    """A trial as a planner learns from it, or ``None`` if it is not history: completed (with its
    outcomes), failed or vetoed (a failure: do not go there), abandoned after it reached an
    instrument (tried, no result), rejected by a person (a failure too: someone who knows the
    chemistry said no). A proposal rejected because nobody answered in time is not history: no one
    judged the point, and a night of unanswered proposals must not teach the planner a region fails."""
    if t.state == "completed" and t.observation is not None:
        return HistoryItem(t.parameters, "completed", dict(t.observation.values))
    if t.state in ("failed", "vetoed"):
        return HistoryItem(t.parameters, "failed")
    if t.state == "rejected":
        return None if (t.reason or "").startswith(APPROVAL_TIMEOUT) else HistoryItem(t.parameters, "failed")
    if t.state == "abandoned" and t.started_at is not None:
        return HistoryItem(t.parameters, "abandoned")
    return None


def _later(now: datetime, seconds: float) -> datetime:
    from datetime import timedelta

    return now + timedelta(seconds=seconds)


def _trial_body(trial: TrialRow, from_state: str | None, actor: str, reason: str) -> dict[str, Any]:
    """What the stream says of a trial's change: enough to follow a campaign without the ledger."""
    return {"campaign_id": trial.campaign_id, "trial_id": trial.id, "number": trial.number,
            "state": trial.state, "from_state": from_state, "actor": actor, "reason": reason,
            "parameters": dict(trial.parameters), "instrument": trial.instrument,
            "run_uid": trial.run_uid, "at": utcnow().timestamp()}


def _suspension_body(row: SuspensionRow, trial: TrialRow | None) -> dict[str, Any]:
    """What the stream says of an interlock's suspension (tripped, or cleared with its times)."""
    def stamp(t: datetime | None) -> float | None:
        return None if t is None else (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()

    return {"campaign_id": row.campaign_id, "suspension_id": row.id, "trial_id": row.trial_id,
            "number": trial.number if trial is not None else None, "instrument": row.instrument,
            "pv": row.pv, "allowed": row.allowed, "state": "cleared" if row.cleared_at else "tripped",
            "value": row.value, "tripped_at": stamp(row.tripped_at), "cleared_value": row.cleared_value,
            "cleared_at": stamp(row.cleared_at), "resumed_at": stamp(row.resumed_at)}


def _command_body(row: CommandRow) -> dict[str, Any]:
    return {"campaign_id": row.campaign_id, "command_id": row.id, "user": row.user, "role": row.role,
            "via": row.via, "action": row.action, "trial": row.trial_number, "args": row.args,
            "reason": row.reason, "status": row.status, "outcome": row.outcome,
            "at": utcnow().timestamp()}


def _finite_or_none(x: float | None) -> float | None:
    import math

    return float(x) if x is not None and math.isfinite(x) else None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Plain JSON types only (numpy and torch scalars become floats/ints)."""
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
