"""What the console's API takes and answers (pydantic models; FastAPI documents them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

State = Literal["proposed", "vetoed", "rejected", "approved", "running", "completed", "failed", "abandoned"]
Role = Literal["viewer", "operator", "admin"]
#: a time with its offset (SQLite hands back naive UTC; RFC 3339 wants the offset)
Time = Annotated[datetime, AfterValidator(lambda d: d.replace(tzinfo=UTC) if d.tzinfo is None else d)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors ---------------------------------------------------------------------------
class ErrorOut(BaseModel):
    """Every error: what went wrong, the field at fault (if one), and what to do."""

    error: str
    field: str | None = None
    fix: str | None = None
    command: CommandOut | None = Field(None, description="the refused command, when one was written")


# ---- auth -----------------------------------------------------------------------------
class LoginIn(_In):
    name: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)


class MeOut(BaseModel):
    name: str | None = Field(description="the logged-in user; null: anonymous")
    role: Role | None = None
    via: Literal["cookie", "token", "anonymous"]
    csrf_token: str | None = Field(None, description="send it as X-CSRF-Token with every POST made with the cookie")
    auth_required: bool = Field(description="true: every read needs a logged-in user")
    can_control: bool


class OkOut(BaseModel):
    ok: bool = True


# ---- campaigns ------------------------------------------------------------------------
class BudgetOut(BaseModel):
    max_trials: int
    max_wall_time: float | None = None
    trials_done: int = Field(description="trials that reached an instrument and are over (what the budget counts)")
    wall_seconds: float = Field(description="wall time run so far, all sessions together")
    override: dict[str, Any] | None = Field(None, description="the budget an operator set, if any")


class ParameterOut(BaseModel):
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    choices: list[Any] | None = None


class ObjectiveOut(BaseModel):
    name: str
    goal: str
    target: float | None = None


class CampaignSummary(BaseModel):
    id: str = Field(description="'<ledger index>-<campaign id>'")
    name: str
    status: str
    paused: bool
    live: bool = Field(description="a process holds the campaign's lock now")
    counts: dict[str, int]
    created_at: Time | None = None


class CampaignOut(CampaignSummary):
    description: str = ""
    stop_reason: str | None = None
    finished_at: Time | None = None
    budget: BudgetOut
    parameters: list[ParameterOut]
    objectives: list[ObjectiveOut]
    outcomes: list[str]
    approval_policy: str
    stream_address: str | None = None
    waiting: int = Field(description="proposals waiting for a person's approval")
    best: dict[str, Any] | None = Field(None, description="best value and its trial (one objective)")


# ---- trials ---------------------------------------------------------------------------
class ProposalOut(BaseModel):
    trial: int
    planner: str
    model_version: str | None = None
    predicted_mean: dict[str, Any] = Field(default_factory=dict)
    predicted_sd: dict[str, Any] = Field(default_factory=dict)
    acquisition_value: float | None = None
    ood_score: float | None = None
    model_unseen: int | None = None
    proposed_parameters: dict[str, Any] | None = Field(None, description="as the planner proposed them")
    at: Time | None = None


class EventOut(BaseModel):
    from_state: str | None = None
    to_state: str
    at: Time | None = None
    actor: str
    reason: str = ""


class TrialOut(BaseModel):
    number: int
    state: State
    parameters: dict[str, Any]
    outcomes: dict[str, Any] | None = None
    instrument: str | None = None
    awaiting: str | None = Field(None, description="why a proposed trial waits for a person")
    wait_deadline: Time | None = None
    source: str | None = None
    reason: str | None = None
    created_at: Time | None = None
    started_at: Time | None = None
    finished_at: Time | None = None


class TrialDetail(TrialOut):
    events: list[EventOut]
    proposal: ProposalOut | None = None


class TrialPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[TrialOut]


class ProposalPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[ProposalOut]


class ObservationOut(BaseModel):
    trial: int
    values: dict[str, Any]
    units: dict[str, Any] = Field(default_factory=dict)
    at: Time | None = None


class WaitingOut(BaseModel):
    trial: int
    parameters: dict[str, Any]
    awaiting: str
    wait_deadline: Time | None = None
    proposal: ProposalOut | None = None


class InstrumentOut(BaseModel):
    instrument: str
    trial: int
    state: State
    parameters: dict[str, Any]
    since: Time | None = None


class InterlockHold(BaseModel):
    """An interlock holding a station's run now: the PV, its allowed range, the value that tripped it."""

    pv: str
    allowed: str = ""
    value: float | None = None
    since: Time | None = None


class StationOut(BaseModel):
    """One station of the campaign (``reactor-2`` of ``concurrency: 3``): what it runs, whether it
    is in rotation (and if not, who took it out, when and why), whether an interlock holds it."""

    station: str
    instrument: str
    in_rotation: bool = True
    out_reason: str | None = None
    out_by: str | None = None
    out_since: Time | None = None
    trial: int | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    running_since: Time | None = None
    held: InterlockHold | None = None


class ModelVersionOut(BaseModel):
    number: int
    label: str
    kind: str
    n_points: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] = Field(default_factory=dict)
    created_at: Time | None = None


class CommandOut(BaseModel):
    id: int
    at: Time | None = None
    user: str
    role: str
    via: str
    action: str
    trial: int | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""
    status: Literal["pending", "applied", "refused", "denied"]
    outcome: str = ""
    applied_at: Time | None = None


class CommandPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[CommandOut]


class FiguresOut(BaseModel):
    """The data every plot is drawn from (the page and ``labpilot report`` share it)."""

    objectives: list[ObjectiveOut]
    parameters: list[str]
    trials: list[int] = Field(description="completed trials, in order")
    values: dict[str, list[float | None]] = Field(description="each outcome per completed trial")
    best_so_far: list[float | None] = Field(description="best of the first objective up to each completed trial")
    param_values: dict[str, list[Any]] = Field(description="each parameter per trial (every trial with a state)")
    param_trials: list[int]
    param_states: list[str]
    pareto: list[int] = Field(description="trials on the Pareto front (two or more objectives)")
    calibration: dict[str, list[float | None]] = Field(description="each calibration figure over model versions")
    model_numbers: list[int]


# ---- control --------------------------------------------------------------------------
class ReasonIn(_In):
    reason: str = Field("", max_length=2000)


class RejectIn(_In):
    reason: str = Field(min_length=1, max_length=2000, description="why: a rejection needs one")


class ApproveIn(_In):
    edits: dict[str, float | int | str] | None = Field(None, description="parameters to change before approving")
    reason: str = Field("", max_length=2000)


class BudgetIn(_In):
    max_trials: int | None = Field(None, ge=1)
    max_wall_time: float | None = Field(None, gt=0, allow_inf_nan=False)
    reason: str = Field("", max_length=2000)


class AddIn(_In):
    parameters: dict[str, float | int | str]
    reason: str = Field("", max_length=2000)


class TellIn(_In):
    values: dict[str, float] | None = Field(None, description="each outcome the person measured")
    failed: str | None = Field(None, max_length=2000, description="or why the measurement failed")
    reason: str = Field("", max_length=2000)


class ImportIn(_In):
    rows: list[dict[str, float | int | str]] = Field(min_length=1, max_length=100_000,
                                                     description="one per experiment: every parameter and outcome")
    source: str = Field("console", max_length=500)


ErrorOut.model_rebuild()
