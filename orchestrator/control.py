"""Operator commands: written to the ledger first, then carried out by the running campaign.

Every action an operator takes (pause, resume, stop; approve, edit-then-approve
or reject a proposal waiting for approval; abandon a running trial; re-queue
an abandoned or failed one; change the budget; add a trial by hand; tell the
result a person measured; import past results; take an instrument station out
of rotation or bring it back) is a row of the ledger's
``commands`` table first: who, when, what, why. The campaign that runs it,
in whatever process or host, polls the ledger for pending commands and
carries each out, recording what came of it (``applied`` or ``refused``, in
words). A command to a campaign that is not running waits, and is carried
out when it resumes. The ledger, not a socket, is the source of truth; the
command line and the console both come through here, nothing else changes a
campaign from outside.

:meth:`Control.submit` checks what it can at once (the trial exists and is in
a state the action takes, the values fit the search space) and refuses with a
:class:`ControlError` saying why; the campaign checks again when it carries
the command out, since the trial may have moved on in between. Every refusal,
a caller without the role included, is kept in the audit log.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from orchestrator.ledger import CommandRow, Ledger, TrialRow

#: what each action takes: a trial number, a station (``args["station"]``)
ACTIONS: dict[str, dict[str, bool]] = {
    "pause": {"trial": False}, "resume": {"trial": False}, "stop": {"trial": False},
    "budget": {"trial": False}, "add": {"trial": False}, "import": {"trial": False},
    "approve": {"trial": True}, "reject": {"trial": True}, "abandon": {"trial": True},
    "requeue": {"trial": True}, "tell": {"trial": True},
    "retire": {"trial": False, "station": True}, "restore": {"trial": False, "station": True},
}
#: roles that may control a campaign (a viewer watches)
CONTROL_ROLES = frozenset({"operator", "admin"})
#: states from which a trial may be re-queued as a new trial with the same parameters
REQUEUEABLE = ("abandoned", "failed", "rejected")


class ControlError(Exception):
    """A command refused: the message says why and what to do instead (CLI: exit 2; API: 409)."""

    status = 409


class NotFound(ControlError):
    """The campaign or trial named does not exist (API: 404)."""

    status = 404


class Forbidden(ControlError):
    """The caller's role may not do this (API: 403 or 401 when anonymous)."""

    status = 403


@dataclass(frozen=True)
class Actor:
    """Who asks: a user's name, role (viewer, operator, admin) and the way in (cli, api, console)."""

    name: str
    role: str = "operator"
    via: str = "cli"


def campaign_is_live(campaign: Any, now: datetime | None = None) -> bool:
    """A process holds the campaign's lock and its lease has not lapsed: it is running now."""
    if not campaign.lock_owner or campaign.lock_expires is None:
        return False
    expires = campaign.lock_expires
    if expires.tzinfo is None:  # SQLite hands back naive UTC
        expires = expires.replace(tzinfo=UTC)
    return expires > (now or datetime.now(UTC))


def parse_value(parameter: Any, raw: Any) -> Any:
    """``raw`` (a string from the command line or JSON) as ``parameter`` declares its type; a
    ``ControlError`` naming the parameter, its type and range when it does not fit."""
    name = parameter.name
    if parameter.type == "categorical":
        for choice in parameter.choices:
            if str(choice) == str(raw) or choice == raw:
                return choice
        raise ControlError(f"{name}={raw!r} is none of its choices {list(parameter.choices)}")
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ControlError(f"{name}={raw!r} is not a finite number") from None
    if parameter.type == "int":
        if value != int(value):
            raise ControlError(f"{name}={raw!r} is not a whole number ({name} is an int parameter)")
        value = int(value)
    if not (parameter.lower <= value <= parameter.upper):
        raise ControlError(f"{name}={raw!r} is outside its range [{parameter.lower}, {parameter.upper}]")
    return value


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["x=1", "y=2"]`` as ``{"x": "1", "y": "2"}``; ``ControlError`` on an item without ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ControlError(f"cannot read {item!r}; write NAME=VALUE, e.g. temperature=120")
        out[key.strip()] = value.strip()
    return out


class Control:
    """Submit operator commands to one campaign, and read what came of them."""

    def __init__(self, ledger: Ledger, campaign_id: int) -> None:
        self.ledger, self.campaign_id = ledger, campaign_id
        self.campaign = ledger.campaign(campaign_id)
        if self.campaign.id != campaign_id:
            raise NotFound(f"no campaign with id {campaign_id}")
        self._spec: Any = None

    # ---- reading ----------------------------------------------------------------
    @property
    def spec(self) -> Any:
        """The campaign's recorded spec (a ``CampaignSpec``), as its last run took it."""
        if self._spec is None:
            from orchestrator.spec import CampaignSpec

            self._spec = CampaignSpec.model_validate(self.ledger.campaign(self.campaign_id).spec)
        return self._spec

    def live(self) -> bool:
        return campaign_is_live(self.ledger.campaign(self.campaign_id))

    def waiting(self) -> list[TrialRow]:
        """Proposals waiting for a person's approval, oldest first."""
        return [t for t in self.ledger.trials(self.campaign_id, ("proposed",)) if t.awaiting]

    def awaiting_result(self) -> list[TrialRow]:
        """Trials running on a ``kind: manual`` instrument: a person is to measure them."""
        manual = {i.name for i in self.spec.instruments if i.kind == "manual"}
        return [t for t in self.ledger.trials(self.campaign_id, ("running",))
                if _station_instrument(t.instrument, manual)]

    def paused(self) -> bool:
        """Paused once the pending commands are carried out (what the operator will see)."""
        paused = bool(self.ledger.campaign(self.campaign_id).paused)
        for c in self.ledger.pending_commands(self.campaign_id):
            if c.action in ("pause", "resume"):
                paused = c.action == "pause"
        return paused

    # ---- submitting ---------------------------------------------------------------
    def submit(self, action: str, actor: Actor, trial: int | None = None,
               args: dict[str, Any] | None = None, reason: str = "") -> CommandRow:
        """Check and write one command (``pending``); the running campaign carries it out. Raises
        :class:`ControlError` (recorded in the audit log as ``refused`` or ``denied``)."""
        args = dict(args or {})
        if action not in ACTIONS:
            raise ControlError(f"unknown action {action!r}; actions are {sorted(ACTIONS)}")
        if actor.role not in CONTROL_ROLES:
            self.ledger.add_command(self.campaign_id, actor.name, actor.role, actor.via, action, trial, args,
                                    reason, status="denied", outcome=f"role {actor.role!r} may not {action}")
            raise Forbidden(f"{actor.name!r} is a {actor.role}; only an operator or admin may {action} "
                            "(an admin can change the role with 'labpilot user add NAME --role operator')")
        try:
            args = self._check(action, trial, args, reason)
        except ControlError as exc:
            self.ledger.add_command(self.campaign_id, actor.name, actor.role, actor.via, action, trial, args,
                                    reason, status="refused", outcome=str(exc))
            raise
        return self.ledger.add_command(self.campaign_id, actor.name, actor.role, actor.via, action, trial,
                                       args, reason)

    def wait(self, command: CommandRow, timeout: float = 10.0, poll: float = 0.05) -> CommandRow:
        """The command once the campaign has carried it out, or as it is after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        row = command
        while row.status == "pending" and time.monotonic() < deadline:
            time.sleep(poll)
            row = self.ledger.command(command.id)
        return row

    def _trial(self, number: int | None) -> TrialRow:
        if number is None:
            raise ControlError("this action needs a trial number")
        t = self.ledger.trial_by_number(self.campaign_id, number)
        if t is not None:
            return t
        raise NotFound(f"campaign {self.campaign.name!r} has no trial {number}; 'labpilot status DIR' "
                       "lists its trials")

    def _point(self, raw: dict[str, Any], partial: bool = False) -> dict[str, Any]:
        space = self.spec.search_space()
        known = {p.name: p for p in space.parameters}
        unknown = [k for k in raw if k not in known]
        if unknown:
            raise ControlError(f"unknown parameter(s) {unknown}; the campaign's parameters are {list(known)}")
        missing = [k for k in known if k not in raw]
        if missing and not partial:
            raise ControlError(f"give every parameter: missing {missing}")
        return {k: parse_value(known[k], v) for k, v in raw.items()}

    def _check(self, action: str, number: int | None, args: dict[str, Any], reason: str) -> dict[str, Any]:
        """The command's arguments, normalised; ``ControlError`` when it cannot be carried out."""
        campaign = self.ledger.campaign(self.campaign_id)
        if action == "pause":
            if self.paused():
                raise ControlError(f"campaign {campaign.name!r} is paused already; 'resume' undoes it")
            return {}
        if action == "resume":
            if not self.paused():
                raise ControlError(f"campaign {campaign.name!r} is not paused; a stopped or finished campaign "
                                   "is started again with 'labpilot run FILE'")
            return {}
        if action == "stop":
            if not self.live():
                raise ControlError(f"campaign {campaign.name!r} is not running (status {campaign.status}); "
                                   "there is nothing to stop")
            return {}
        if action == "budget":
            out: dict[str, Any] = {}
            if args.get("max_trials") is not None:
                try:
                    out["max_trials"] = int(args["max_trials"])
                except (TypeError, ValueError):
                    raise ControlError(f"max_trials={args['max_trials']!r} is not a whole number") from None
                if out["max_trials"] < 1:
                    raise ControlError("max_trials must be at least 1")
            if args.get("max_wall_time") is not None:
                try:
                    out["max_wall_time"] = float(args["max_wall_time"])
                except (TypeError, ValueError):
                    raise ControlError(f"max_wall_time={args['max_wall_time']!r} is not a number") from None
                if not (math.isfinite(out["max_wall_time"]) and out["max_wall_time"] > 0):
                    raise ControlError("max_wall_time must be a positive number of seconds")
            if not out:
                raise ControlError("give max_trials and/or max_wall_time")
            return out
        if action == "add":
            return {"parameters": self._point(dict(args.get("parameters") or {}))}
        if action in ("retire", "restore"):
            return self._check_station(action, args, reason)
        if action == "import":
            rows = args.get("rows")
            if not isinstance(rows, list) or not rows:
                raise ControlError("an import needs rows of parameters and outcomes")
            return {"rows": rows, "source": str(args.get("source") or "")}
        t = self._trial(number)
        if action in ("approve", "reject"):
            if t.state != "proposed" or not t.awaiting:
                raise ControlError(f"trial {t.number} is not waiting for approval (it is {t.state}"
                                   f"{': ' + t.reason if t.reason else ''})")
            if action == "reject" and not reason.strip():
                raise ControlError("say why: a rejection needs a reason (--reason ...)")
            if action == "approve" and args.get("edits"):
                return {"edits": self._point(dict(args["edits"]), partial=True)}
            return {}
        if action == "abandon":
            if t.state not in ("running", "approved"):
                hint = "; a proposal waiting for approval is rejected instead" if t.state == "proposed" else ""
                raise ControlError(f"trial {t.number} is {t.state}, not running{hint}")
            return {}
        if action == "requeue":
            if t.state not in REQUEUEABLE:
                raise ControlError(f"trial {t.number} is {t.state}; only an abandoned, failed or rejected "
                                   "trial is re-queued")
            return {}
        # tell
        manual = {i.name: i for i in self.spec.instruments if i.kind == "manual"}
        inst = _station_instrument(t.instrument, set(manual))
        if t.state != "running" or inst is None:
            raise ControlError(f"trial {t.number} is not waiting for a measured result (it is {t.state}"
                               f"{' on ' + t.instrument if t.instrument else ''}); 'labpilot suggest DIR' "
                               "lists the trials a person is to measure")
        if args.get("failed"):
            return {"failed": str(args["failed"])}
        values = dict(args.get("values") or {})
        wanted = list(manual[inst].outcomes or [])
        unknown = [k for k in values if k not in wanted]
        missing = [k for k in wanted if k not in values]
        if unknown or missing:
            raise ControlError(f"instrument {inst!r} measures {wanted}: "
                               + (f"missing {missing}" if missing else "")
                               + ("; " if missing and unknown else "") + (f"unknown {unknown}" if unknown else ""))
        out = {}
        for k, v in values.items():
            try:
                out[k] = float(v)
                if isinstance(v, bool) or not math.isfinite(out[k]):
                    raise ValueError
            except (TypeError, ValueError):
                raise ControlError(f"{k}={v!r} is not a finite number") from None
        return {"values": out}

    def _check_station(self, action: str, args: dict[str, Any], reason: str) -> dict[str, Any]:
        station = str(args.get("station") or "")
        stations = self.spec.stations
        if station not in stations:
            raise NotFound(f"campaign {self.campaign.name!r} has no station {station!r}; its stations are "
                           f"{stations}")
        out = self.ledger.out_of_rotation(self.campaign_id)
        for c in self.ledger.pending_commands(self.campaign_id):  # what the operator will see
            if c.action in ("retire", "restore") and c.args.get("station") == station:
                out = {k: v for k, v in out.items() if k != station} if c.action == "restore" else {**out, station: c}
        if action == "retire":
            if station in out:
                raise ControlError(f"station {station!r} is out of rotation already; 'labpilot restore' brings "
                                   "it back")
            if not reason.strip():
                raise ControlError(f"say why: taking {station!r} out of rotation needs a reason (--reason ...)")
        elif station not in out:
            raise ControlError(f"station {station!r} is in rotation (it is given trials); 'labpilot retire' "
                               "takes it out")
        return {"station": station}

    # ---- conveniences (the CLI and the console call these) ------------------------
    def import_rows(self, actor: Actor, frame: Any, source: str) -> CommandRow:
        """Submit a table of past results (a pandas frame: one column per parameter and per
        outcome); every bad row is named in one ``ControlError``."""
        rows, errors = [], []
        params = [p.name for p in self.spec.parameters]
        outcomes = self.spec.outcome_names
        missing = [c for c in params + outcomes if c not in frame.columns]
        if missing:
            raise ControlError(f"{source}: the file lacks the column(s) {missing}; it needs one per parameter "
                               f"{params} and per outcome {outcomes}")
        space = self.spec.search_space()
        for i, rec in enumerate(frame.to_dict("records")):
            line = i + 2  # the header is line 1
            try:
                point = self._point({k: rec[k] for k in params})
                space.validate_point(point)
                values = {}
                for o in outcomes:
                    v = rec[o]
                    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
                        raise ControlError(f"outcome {o}={v!r} is not a finite number")
                    values[o] = float(v)
            except (ControlError, ValueError) as exc:
                errors.append(f"line {line}: {exc}")
                continue
            rows.append({"parameters": point, "values": values, "line": line})
        if errors:
            raise ControlError(f"{source}: {len(errors)} of {len(frame)} rows cannot be imported (nothing was "
                               "imported); fix them and import again:\n  " + "\n  ".join(errors))
        return self.submit("import", actor, args={"rows": rows, "source": source},
                           reason=f"{len(rows)} measured rows from {source}")


def _station_instrument(station: str | None, instruments: set[str]) -> str | None:
    """The instrument a station (``name`` or ``name-2``) belongs to, if it is one of ``instruments``."""
    if not station:
        return None
    if station in instruments:
        return station
    base, _, lane = station.rpartition("-")
    return base if lane.isdigit() and base in instruments else None


# ---- carrying commands out (the running campaign) ---------------------------------------
class Campaign(Protocol):
    """What the running campaign gives the applier (orchestrator.flows' dispatcher)."""

    paused: bool
    backlog: list[int]

    def request_stop(self, reason: str) -> None: ...
    def abandon_trial(self, trial_id: int, reason: str) -> str | None: ...
    def set_budget(self, budget: dict[str, Any]) -> None: ...
    def tell_result(self, trial_id: int, values: dict[str, float] | None, failed: str | None) -> str | None: ...
    def check_point(self, parameters: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]: ...
    def set_rotation(self, station: str, in_rotation: bool, user: str, reason: str) -> str | None: ...


class Applier:
    """Carries out a campaign's pending commands, in the order they were written."""

    def __init__(self, ledger: Ledger, campaign_id: int, target: Campaign) -> None:
        self.ledger, self.campaign_id, self.target = ledger, campaign_id, target

    def apply_pending(self) -> int:
        """Carry out every pending command; returns how many there were."""
        if not self.ledger.has_pending_commands(self.campaign_id):
            return 0
        commands = self.ledger.pending_commands(self.campaign_id)
        for c in commands:
            try:
                status, outcome = self._apply(c)
            except ControlError as exc:
                status, outcome = "refused", str(exc)
            except Exception as exc:  # noqa: BLE001 - a command must never take the campaign down
                status, outcome = "refused", f"could not carry it out: {type(exc).__name__}: {exc}"
            self.ledger.finish_command(c.id, status, outcome)
        return len(commands)

    def _trial(self, number: int | None) -> TrialRow:
        t = self.ledger.trial_by_number(self.campaign_id, number) if number is not None else None
        if t is None:
            raise NotFound(f"no trial {number}")
        return t

    def _apply(self, c: CommandRow) -> tuple[str, str]:
        who = f"{c.user} ({c.via})"
        why = f": {c.reason}" if c.reason else ""
        if c.action == "pause":
            self.target.paused = True
            self.ledger.update_campaign(self.campaign_id, paused=True)
            return "applied", "paused: running trials finish, nothing new is dispatched"
        if c.action == "resume":
            self.target.paused = False
            self.ledger.update_campaign(self.campaign_id, paused=False)
            return "applied", "resumed"
        if c.action == "stop":
            self.target.request_stop(f"stopped by {c.user}{why}")
            return "applied", "stopping: running trials finish, then the campaign ends"
        if c.action == "budget":
            self.target.set_budget(dict(c.args))
            return "applied", "budget now " + ", ".join(f"{k}={v}" for k, v in c.args.items())
        if c.action == "import":
            for row in c.args["rows"]:
                point, bad = self.target.check_point(row["parameters"])
                if bad:
                    raise ControlError(f"line {row.get('line')}: {bad}")
            for row in c.args["rows"]:
                self.ledger.record_import(self.campaign_id, row["parameters"], row["values"],
                                          source=f"import from {c.args.get('source')}",
                                          reason=f"imported by {c.user} from {c.args.get('source')} "
                                                 f"(line {row.get('line')})")
            return "applied", f"imported {len(c.args['rows'])} completed trials"
        if c.action in ("retire", "restore"):
            station = c.args["station"]
            problem = self.target.set_rotation(station, c.action == "restore", c.user,
                                               f"{'restored' if c.action == 'restore' else 'taken out of rotation'}"
                                               f" by {who}{why}")
            if problem:
                raise ControlError(problem)
            return "applied", (f"station {station!r} is back in rotation" if c.action == "restore" else
                               f"station {station!r} is out of rotation: it is given no trials until restored")
        if c.action == "add":
            tid = self._operator_trial(c.args["parameters"], f"added by {c.user}", f"added by hand by {who}{why}")
            return "applied", f"trial {self.ledger.trial(tid).number} added and approved; it runs when a station is free"
        t = self._trial(c.trial_number)
        if c.action in ("approve", "reject"):
            if t.state != "proposed" or not t.awaiting:
                raise ControlError(f"trial {t.number} is no longer waiting for approval (it is {t.state})")
            if c.action == "reject":
                self.ledger.set_awaiting(t.id, None)
                self.ledger.transition(t.id, "rejected", "operator", f"rejected by {c.user}{why}")
                return "applied", f"trial {t.number} rejected"
            params, edited = dict(t.parameters), ""
            if c.args.get("edits"):
                new = {**params, **c.args["edits"]}
                edited = " (edited: " + ", ".join(f"{k} {params[k]!r} -> {v!r}" for k, v in c.args["edits"].items()
                                                  if params.get(k) != v) + ")"
                self.ledger.set_parameters(t.id, new)
                params = new
            self.ledger.set_awaiting(t.id, None)
            point, bad = self.target.check_point(params)
            if bad:
                self.ledger.transition(t.id, "vetoed", "system", f"{bad} (approved by {c.user}{edited})")
                raise ControlError(f"trial {t.number} was vetoed by the safety envelope, not run: {bad}")
            self.ledger.transition(t.id, "approved", "operator", f"approved by {who}{edited}{why}")
            self.target.backlog.append(t.id)
            return "applied", f"trial {t.number} approved{edited}"
        if c.action == "abandon":
            problem = self.target.abandon_trial(t.id, f"abandoned by {c.user}{why}")
            if problem:
                raise ControlError(problem)
            return "applied", f"trial {t.number} abandoned"
        if c.action == "requeue":
            if t.state not in REQUEUEABLE:
                raise ControlError(f"trial {t.number} is {t.state}; it cannot be re-queued")
            tid = self._operator_trial(dict(t.parameters), f"requeue of trial {t.number}",
                                       f"re-queued trial {t.number} by {who}{why}")
            return "applied", f"trial {t.number} re-queued as trial {self.ledger.trial(tid).number}"
        if c.action == "tell":
            problem = self.target.tell_result(t.id, c.args.get("values"), c.args.get("failed"))
            if problem:
                raise ControlError(problem)
            return "applied", f"trial {t.number}: result recorded"
        raise ControlError(f"unknown action {c.action!r}")

    def _operator_trial(self, parameters: dict[str, Any], source: str, reason: str) -> int:
        """A trial the operator asks for: proposed and approved by them, then passed through the
        safety envelope at dispatch like every other."""
        from planners.base import Proposal

        point, bad = self.target.check_point(parameters)
        proposal = Proposal(parameters=dict(parameters), planner="operator", seed=0)
        tid = self.ledger.propose(self.campaign_id, proposal, actor="operator", source=source, reason=reason)
        if bad:
            self.ledger.transition(tid, "vetoed", "system", bad)
            raise ControlError(f"trial {self.ledger.trial(tid).number} was vetoed by the safety envelope: {bad}")
        self.ledger.transition(tid, "approved", "operator", reason)
        self.target.backlog.append(tid)
        return tid
