"""The campaign file: ``CampaignSpec`` (pydantic v2), loaded from YAML with errors a person can act on.

Every problem in a file is reported at once, each with its path in the file
(``instruments[0].timeout``) and what to write instead: the checks that compare
fields with each other (an objective no instrument measures) run on whatever
validated, alongside the errors of the fields that did not.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from planners import PLANNERS, Problem
from planners.space import (
    LinearConstraint,
    Objective,
    OutcomeConstraint,
    Parameter,
    SearchSpace,
)


def _objectives_shorthand(v: Any) -> Any:
    """Objectives as written: ``- yield: maximize`` items, or one mapping ``{yield: maximize, cost: minimize}``."""
    if v is None:
        return []
    if isinstance(v, dict) and "name" not in v:
        v = [{k: g} for k, g in v.items()]
    if not isinstance(v, list):
        return v
    out = []
    for o in v:
        if isinstance(o, dict) and len(o) == 1 and "name" not in o:
            (name, goal), = o.items()
            out.append({"name": name, "goal": goal})
        else:
            out.append(o)
    return out


def _constraint_item(c: Any) -> Any:
    """A linear constraint as written: ``"x1 + 2*x2 <= 10"`` or ``{fractions: [a, b], total: 1}``."""
    if isinstance(c, str):
        return LinearConstraint.parse(c)
    if isinstance(c, dict) and "fractions" in c:
        extra = set(c) - {"fractions", "total"}
        if extra:
            raise ValueError(f"a fractions group takes 'fractions' and 'total', not {sorted(extra)}")
        names = c["fractions"]
        if not isinstance(names, list) or len(names) < 2:
            raise ValueError("'fractions' must be a list of two or more parameter names, e.g. [a, b, c]")
        try:
            total = float(c.get("total", 1.0))
        except (TypeError, ValueError):
            raise ValueError(f"'total' must be a number (got {c.get('total')!r})") from None
        return LinearConstraint(coefficients={str(n): 1.0 for n in names}, op="==", rhs=total)
    return c


def _outcome_constraint_item(c: Any) -> Any:
    return OutcomeConstraint.parse(c) if isinstance(c, str) else c


Constraint = Annotated[LinearConstraint, BeforeValidator(_constraint_item)]
OutcomeBound = Annotated[OutcomeConstraint, BeforeValidator(_outcome_constraint_item)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Spec):
    """When the campaign stops: whichever limit is reached first."""

    max_trials: int = Field(30, ge=1, description="experiments to run (completed or failed)")
    max_wall_time: float | None = Field(None, gt=0, description="seconds from the campaign's start")
    max_consecutive_failures: int = Field(
        10, ge=1, description="stop when this many trials fail in a row: the hardware needs a person"
    )


class PlannerSpec(_Spec):
    name: str = "bo"
    options: dict[str, Any] = Field(default_factory=dict)
    ask_ahead: bool | Literal["auto"] = Field(
        "auto", description="ask the planner for the next trial while every station is busy, so that "
        "none waits for it (the proposal misses the results still running); auto: with two stations "
        "or more, under the auto approval policy")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PLANNERS:
            raise ValueError(f"unknown planner {v!r}; choose one of {sorted(PLANNERS)}")
        return v


class EpicsParameter(_Spec):
    """How one parameter is set over EPICS: its ``setpoint`` PV, and how the move is known to be
    done: a ``readback`` within ``tolerance`` (then ``settle_time``), ``put_complete: true`` (the
    IOC answers the put when done), or a ``done`` PV reaching ``done_value``."""

    setpoint: str = Field(min_length=1, description="the PV written with the parameter's value")
    readback: str | None = Field(None, min_length=1, description="the PV that reads where it is")
    tolerance: float | None = Field(None, gt=0, allow_inf_nan=False,
                                    description="the move is done when |readback - setpoint| <= tolerance")
    settle_time: float = Field(0.0, ge=0, allow_inf_nan=False, description="seconds to wait after arriving")
    put_complete: bool = Field(False, description="the IOC completes the put when the move is done")
    done: str | None = Field(None, min_length=1, description="a PV that says the move is done")
    done_value: float | int | str = Field(1, description="the value of 'done' when the move is done")
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False,
                                  description="seconds this move may take (default: the block's 'timeout')")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"setpoint": v, "put_complete": True} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_way_to_know_done(self) -> EpicsParameter:
        ways = [w for w, on in (("readback", self.readback), ("put_complete", self.put_complete),
                                ("done", self.done)) if on]
        if len(ways) != 1:
            raise ValueError(
                "say how a move is known to be done with exactly one of 'readback: PV' (with "
                "'tolerance'), 'put_complete: true' or 'done: PV' (with 'done_value')"
                + (f"; got {ways}" if ways else "; got none"))
        if self.readback and self.tolerance is None:
            raise ValueError("a 'readback' needs a 'tolerance' (e.g. tolerance: 0.01): how close is arrived")
        if self.tolerance is not None and not self.readback:
            raise ValueError("'tolerance' is for a 'readback' PV; add 'readback: PV' or remove 'tolerance'")
        if "done_value" in self.model_fields_set and not self.done:
            raise ValueError("'done_value' is for a 'done' PV; add 'done: PV' or remove 'done_value'")
        return self


class EpicsTrigger(_Spec):
    """The acquisition: ``pv`` written with ``value``; done when the put completes
    (``put_complete``, the default) or when the ``busy`` PV goes from 1 back to 0."""

    pv: str = Field(min_length=1, description="the acquire PV")
    value: float | int | str = 1
    put_complete: bool | None = Field(None, description="wait for the put to complete (default: when "
                                      "there is no 'busy' PV)")
    busy: str | None = Field(None, min_length=1, description="a PV that is 1 while acquiring")
    error: str | None = Field(None, min_length=1, description="a PV that, when not 0 or empty after the "
                              "acquisition, says why it failed")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"pv": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_way(self) -> EpicsTrigger:
        if self.busy and self.put_complete:
            raise ValueError("give either 'busy: PV' or 'put_complete: true' for the trigger, not both")
        if self.put_complete is False and not self.busy:
            raise ValueError("with 'put_complete: false' the trigger needs 'busy: PV' to know it is done")
        return self


class EpicsResult(_Spec):
    """One outcome's result PV; ``units`` default to the PV's own (its EGU). Where both are given
    and differ, the instrument is refused when it connects (no silent mix of mW and W)."""

    pv: str = Field(min_length=1)
    units: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"pv": v} if isinstance(v, str) else v


class EpicsSpec(_Spec):
    """A ``kind: epics`` instrument, declared in the file alone (``instruments.epics`` builds it).

    ``prefix`` is put before every PV name that does not already begin with it.
    """

    prefix: str = ""
    parameters: dict[str, EpicsParameter] = Field(min_length=1)
    trigger: EpicsTrigger | None = None
    results: dict[str, EpicsResult] = Field(min_length=1)
    counter: str | None = Field(None, min_length=1, description="a PV that advances after each "
                                "acquisition; the results are read only once it has")
    timeout: float = Field(10.0, gt=0, allow_inf_nan=False,
                           description="seconds each move, trigger and read may take")
    connection_timeout: float = Field(5.0, gt=0, allow_inf_nan=False,
                                      description="seconds to wait for the PVs to connect")

    def pv(self, name: str) -> str:
        return name if name.startswith(self.prefix) else self.prefix + name


class InterlockSpec(_Spec):
    """One entry of an instrument's ``suspend_when``: an EPICS PV (a temperature, a pressure)
    and its allowed range, ``min <= value <= max`` (either bound may be left out). Out of range,
    the instrument's run is suspended (bluesky's ``SuspendFloor``/``SuspendCeil`` on its
    RunEngine); back in range, it goes on ``resume_after`` seconds later. The PV name is used as
    written (an ``epics:`` block's ``prefix`` does not apply: an interlock is often another IOC's).
    """

    pv: str = Field(min_length=1, description="the PV watched, e.g. 'chiller:temperature'")
    min: float | None = Field(None, allow_inf_nan=False, description="the lowest allowed value")
    max: float | None = Field(None, allow_inf_nan=False, description="the highest allowed value")
    resume_after: float = Field(0.0, ge=0, allow_inf_nan=False,
                                description="seconds to wait, once back in range, before the run goes on")
    max_wait: float = Field(3600.0, gt=0, allow_inf_nan=False,
                            description="seconds one trial may wait for the PV to come back; then that "
                            "trial is abandoned (not failed: its point is not at fault)")

    @model_validator(mode="after")
    def _a_range(self) -> InterlockSpec:
        if self.min is None and self.max is None:
            raise ValueError(f"give the allowed range of {self.pv!r}: 'min', 'max' or both "
                             f"(e.g. {{pv: {self.pv!r}, min: 10, max: 80}})")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ValueError(f"min {self.min:g} is not below max {self.max:g}; swap them or widen the range")
        return self


class RetrySpec(_Spec):
    """How an instrument's trial retries what can be done again without using material twice:
    the reading of its results (a read that timed out, a PV that dropped and came back). The
    acquisition (trigger) and the moves are never retried: a second acquisition, or a second put
    of a setpoint on a pump, could use material again; a failure there fails the trial."""

    reads: int = Field(3, ge=1, le=20, description="attempts at reading the results (1: no retry)")
    delay: float = Field(0.5, ge=0, le=600, allow_inf_nan=False, description="seconds between attempts")

    @model_validator(mode="before")
    @classmethod
    def _only_reads(cls, v: Any) -> Any:
        if isinstance(v, dict):
            unsafe = [k for k in v if k in ("acquire", "acquisitions", "trigger", "triggers", "moves", "move",
                                            "trials", "trial")]
            if unsafe:
                raise ValueError(f"{unsafe[0]!r} cannot be retried: a second acquisition or move could use "
                                 "material again, so only 'reads' (and their 'delay') are; remove it")
        return v


#: the kinds whose RunEngine talks to real hardware, where an EPICS interlock can be watched
INTERLOCK_KINDS = ("epics", "ophyd")


class MappedSimulator(_Spec):
    """A test function rehearsing the campaign under its own names (``simulators.rehearsal``):
    ``{problem: hartmann6, map: {temperature: x1, ...}, fixed: {x6: 0.2}, outcomes: {yield: y}}``.

    Each campaign parameter is scaled from its bounds onto its input's; inputs left out of
    ``map`` are held at ``fixed`` (default: the middle of their bounds); each campaign outcome
    is the problem outcome named, negated where the campaign's goal is the opposite one."""

    problem: str = Field(min_length=1, description="an analytic problem: branin, hartmann6, ...")
    map: dict[str, str] = Field(min_length=1, description="campaign parameter -> problem input")
    fixed: dict[str, float] = Field(default_factory=dict, description="problem input -> held value")
    outcomes: dict[str, str] | None = Field(None, description="campaign outcome -> problem outcome; "
                                            "default: the problem's outcomes under their own names")


class EmulatorSpec(_Spec):
    """A model fitted to past experiments stands in for the instrument (``orchestrator.rehearsal``):
    a CSV ``table`` whose columns are named as the campaign's parameters and outcomes, or the
    completed trials of a past campaign in a ``ledger`` (its directory or store URL; ``campaign``
    names it when the ledger holds several). Fitted once when the campaign starts; each
    measurement is a draw from the model's predictive distribution (``noise: false``: its mean)."""

    table: str | None = Field(None, min_length=1, description="a CSV file, relative to the campaign file")
    ledger: str | None = Field(None, min_length=1, description="a campaign directory or a store URL")
    campaign: str | None = Field(None, min_length=1, description="the past campaign's name in 'ledger'")
    model: Literal["gp", "ensemble"] = Field("gp", description="'gp' (ExactGP) or 'ensemble' (DeepEnsemble)")
    noise: bool = Field(True, description="sample the predictive distribution; false: its mean")

    @model_validator(mode="after")
    def _one_source(self) -> EmulatorSpec:
        if (self.table is None) == (self.ledger is None):
            raise ValueError("give the emulator exactly one of 'table: FILE.csv' or 'ledger: DIR-or-URL'")
        if self.campaign is not None and self.ledger is None:
            raise ValueError("'campaign' names a campaign in a 'ledger'; a 'table' has none, remove it")
        return self


INSTRUMENT_KINDS = ("simulator", "dataset", "emulator", "ophyd", "epics", "manual")
_KIND_KEY = {"simulator": "simulator", "dataset": "dataset", "emulator": "emulator", "ophyd": "device",
             "epics": "epics"}


#: fields that only a simulated instrument (simulator, dataset, emulator) has
_SIMULATED_BEHAVIOUR = ("latency", "noise", "drift", "failure_rate", "hang_rate")


class InstrumentSpec(_Spec):
    """One instrument: a simulator (``simulator``, mapped or not, or ``dataset``), a model of past
    experiments (``emulator``), a real ophyd ``device``, an EPICS instrument declared in the file
    (``epics``), or a person (``kind: manual``).

    ``device`` is an import path ``package.module:factory``; the factory returns an
    ophyd device with one settable signal per parameter and one readable signal
    per outcome, named as in the campaign. ``kind`` may be left out: it is the key given.
    """

    name: str = Field(pattern=r"^[A-Za-z_][\w-]*$")
    kind: Literal["simulator", "dataset", "emulator", "ophyd", "epics", "manual"] | None = Field(
        None, description="'simulator', 'dataset', 'emulator', 'ophyd' (a 'device' factory), 'epics' (an "
        "'epics' block) or 'manual' (a person measures and tells the result); default: the key given")
    simulator: str | MappedSimulator | None = None
    dataset: str | None = None
    emulator: EmulatorSpec | None = None
    device: str | None = None
    epics: EpicsSpec | None = None
    outcomes: list[str] | None = None
    parameters: list[str] | None = Field(
        None, description="the parameters this instrument takes (its setpoints); default: every one. "
        "Instruments that split the work (a reactor takes the synthesis parameters, a station measures "
        "the product) are a trial's steps, in the file's order")
    concurrency: int = Field(1, ge=1, le=64, description="identical stations working at once")
    timeout: float = Field(300.0, gt=0, description="seconds one trial may take before it is aborted")
    latency: float | tuple[float, float] = Field(
        0.0, description="simulated seconds per measurement, or [low, high]: drawn uniformly for each one")
    noise: float = Field(0.0, ge=0, description="simulated Gaussian noise (standard deviation)")
    drift: float = Field(0.0, description="simulated drift added per measurement")
    failure_rate: float = Field(0.0, ge=0, le=1)
    hang_rate: float = Field(0.0, ge=0, le=1)
    out_of_rotation_after: int | None = Field(
        None, ge=1, le=1000, description="take a station out of rotation after this many failed trials in "
        "a row on it (its trials go to the others) until an operator restores it; none: never")

    @property
    def stations(self) -> list[str]:
        """The names of this instrument's stations: its own, or ``name-1 .. name-k`` for ``concurrency: k``."""
        if self.concurrency == 1:
            return [self.name]
        return [f"{self.name}-{lane + 1}" for lane in range(self.concurrency)]

    units: dict[str, Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict, description="units of each outcome, e.g. {yield: '%'}; an EPICS result's "
        "default to its PV's own, and a PV that says otherwise is refused")
    retry: RetrySpec = Field(default_factory=RetrySpec, description="retries of a trial's reads, e.g. "
                             "{reads: 3, delay: 0.5}; never of its acquisition")
    suspend_when: list[InterlockSpec] = Field(
        default_factory=list, description="interlocks (kind epics or ophyd): e.g. [{pv: 'chiller:T', "
        "min: 10, max: 80, resume_after: 2}] suspends the run while the PV is out of range")

    def declared_units(self) -> dict[str, str]:
        """Outcome -> the units the file gives it (``units``, or an EPICS result's ``units``)."""
        out = {o: r.units for o, r in (self.epics.results.items() if self.epics else ()) if r.units}
        out.update(self.units)
        return out

    @field_validator("latency")
    @classmethod
    def _latency(cls, v: float | tuple[float, float]) -> float | tuple[float, float]:
        low, high = (v, v) if isinstance(v, int | float) else v
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high < low:
            raise ValueError(f"latency {v!r} must be seconds >= 0, or [low, high] with 0 <= low <= high "
                             "(e.g. latency: [0.5, 2.0])")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> InstrumentSpec:
        given = [k for k in ("simulator", "dataset", "emulator", "device", "epics") if getattr(self, k)]
        if self.kind == "manual":
            if given:
                raise ValueError(f"a 'kind: manual' instrument is a person: remove {given}")
            if not self.outcomes:
                raise ValueError("a 'kind: manual' instrument must list the 'outcomes' the person measures")
            return self
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'simulator: branin|hartmann6|branincurrin' (or 'simulator: "
                "{problem: .., map: {..}}'), 'dataset: <folder>', 'emulator: {table: FILE.csv}', "
                "'device: package.module:factory' or an 'epics:' block "
                f"(got {given or 'none'})")
        kind = next(k for k, key in _KIND_KEY.items() if key == given[0])
        if self.kind is not None and self.kind != kind:
            raise ValueError(f"a 'kind: {self.kind}' instrument takes '{_KIND_KEY[self.kind]}:', "
                             f"not '{given[0]}:'; write kind: {kind} or give '{_KIND_KEY[self.kind]}:'")
        self.kind = kind
        # not 'fields set': a recorded spec (a dump, every field in it) is read back through here too
        simulated = [k for k in _SIMULATED_BEHAVIOUR if getattr(self, k) != type(self).model_fields[k].default]
        if simulated and kind in ("ophyd", "epics"):
            raise ValueError(f"{simulated} describe a simulated instrument; a 'kind: {kind}' instrument is "
                             "real hardware and would ignore them: remove them (rehearse on a 'simulator:' "
                             "instrument to try noise, latency or faults)")
        if kind == "epics" and self.concurrency > 1:
            raise ValueError(f"concurrency {self.concurrency} would make {self.concurrency} stations write the "
                             "same PVs at once; declare one 'kind: epics' instrument per IOC (each its own "
                             "'epics.prefix') instead")
        if self.device and self.outcomes is None:
            raise ValueError("a 'device' instrument must list the 'outcomes' it measures ([] when it "
                             "measures none: a step that only makes the sample)")
        if self.epics is not None:
            if self.outcomes is None:
                self.outcomes = list(self.epics.results)
            missing = [o for o in self.outcomes if o not in self.epics.results]
            if missing:
                raise ValueError(f"outcomes {missing} have no result PV: add them to 'epics.results', "
                                 f"e.g. results: {{{missing[0]}: {{pv: 'PREFIX:{missing[0]}'}}}}")
        return self


class SafetyLimit(_Spec):
    min: float | None = None
    max: float | None = None


class SafetySpec(_Spec):
    """What the hardware must never do (orchestrator.safety enforces it; check_campaign types it).

    - ``limits``: per-parameter ``{min, max}``; ``rules``: linear inequalities every point must meet.
    - ``forbidden``: linear inequalities (``"x1 + x2 >= 12"``) no point may meet: a region vetoed.
    - ``allowed``: for a categorical parameter, the choices that may run (``{solvent: [water]}``).
    - ``max_step``: the largest change of a numeric parameter between consecutive trials started
      on one instrument station (``{x1: 2.0}``); the first trial on a station is free.
    - ``max_trials_per_hour``: trials started per station in any hour: a whole number for every
      station, or per instrument ``{reactor: 30}`` (each of its stations; unnamed ones unlimited).
      A trial that would exceed it waits; it is not vetoed.
    """

    limits: dict[str, SafetyLimit] = Field(default_factory=dict)
    rules: list[Constraint] = Field(default_factory=list)
    forbidden: list[Constraint] = Field(default_factory=list)
    allowed: dict[str, list[str | int | float]] = Field(default_factory=dict)
    max_step: dict[str, float] = Field(default_factory=dict)
    max_trials_per_hour: int | dict[str, int] | None = None

    @property
    def stateful(self) -> bool:
        """Rules that need the station's history (orchestrator.safety.check_dispatch)."""
        return bool(self.max_step) or self.max_trials_per_hour is not None

    def rate_limit(self, instrument: str) -> int | None:
        """Trials per hour allowed on each station of ``instrument`` (``None``: unlimited)."""
        r = self.max_trials_per_hour
        return r.get(instrument) if isinstance(r, dict) else r


class ApprovalSpec(_Spec):
    """Which proposals wait for a person (orchestrator.approval), and for how long."""

    policy: Literal["auto", "manual", "out_of_domain", "rules"] = Field(
        "auto", description="'auto' runs every proposal that passes the safety envelope; 'manual': "
        "every proposal waits for a person; 'out_of_domain': those whose score is above 'threshold'; "
        "'rules': those matching any of 'rules'")
    threshold: float = Field(2.0, gt=0, allow_inf_nan=False,
                             description="out-of-domain score above which a proposal waits")
    rules: list[str] = Field(default_factory=list, description="e.g. 'temperature > 150', 'ood > 2'")
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False,
                                  description="seconds a proposal waits before it is rejected; none: forever")
    hold_instrument: bool = Field(False, description="a waiting proposal keeps its instrument idle for it")
    max_waiting: int | None = Field(None, ge=1, description="proposals waiting at once; default: one per "
                                    "station under 'manual', else ten (or two per station, if more)")

    @model_validator(mode="after")
    def _consistent(self) -> ApprovalSpec:
        from orchestrator.approval import ApprovalRule

        if self.policy == "rules" and not self.rules:
            raise ValueError("policy 'rules' needs 'rules', e.g. rules: ['temperature > 150']")
        if self.rules and self.policy != "rules":
            raise ValueError(f"'rules' are used by policy 'rules' only (the policy is {self.policy!r}); "
                             "write policy: rules, or remove them")
        for r in self.rules:
            ApprovalRule.parse(r)
        return self


class CampaignSpec(_Spec):
    """One optimisation campaign, as written in its YAML file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**32, description="numpy and torch seed: 0 <= seed < 2**32")
    parameters: list[Parameter] = Field(min_length=1)
    constraints: list[Constraint] = Field(default_factory=list)
    objectives: list[Objective] = Field(min_length=1)
    outcome_constraints: list[OutcomeBound] = Field(default_factory=list)
    budget: Budget = Field(default_factory=Budget)
    planner: PlannerSpec = Field(default_factory=PlannerSpec)
    instruments: list[InstrumentSpec] = Field(min_length=1)
    safety: SafetySpec = Field(default_factory=SafetySpec)
    approval: ApprovalSpec = Field(default_factory=ApprovalSpec)
    output: str | None = Field(None, description="campaign directory; default runs/<name>")
    store: str | None = Field(None, description="SQLAlchemy URL of the ledger; default a SQLite file")

    @field_validator("objectives", mode="before")
    @classmethod
    def _parse_objectives(cls, v: Any) -> Any:
        return _objectives_shorthand(v)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes a directory (runs/<name>) that --fresh empties: one safe path component.
        if v in (".", ".."):
            raise ValueError(f"the campaign name {v!r} is a directory reference, not a name; "
                             "use letters, digits, '.', '_' or '-', e.g. 'reactor-01'")
        return v

    @field_validator("store")
    @classmethod
    def _usable_store(cls, v: str | None) -> str | None:
        return None if v is None else check_store_url(v)

    # ---- derived ----------------------------------------------------------
    def search_space(self) -> SearchSpace:
        return SearchSpace(parameters=self.parameters, constraints=self.constraints)

    def problem(self) -> Problem:
        """What the planner optimises; on a ``kind: pool`` table, with the table's rows as the pool
        (every planner then proposes only untried rows, so the best is a measured row)."""
        space = self.search_space()
        return Problem(space=space, objectives=list(self.objectives),
                       outcome_constraints=list(self.outcome_constraints),
                       pool=campaign_pool(self.instruments, space))

    @property
    def stations(self) -> list[str]:
        """Every instrument station's name, in the order the flow builds them."""
        return [s for inst in self.instruments for s in inst.stations]

    @property
    def outcome_names(self) -> list[str]:
        names = [o.name for o in self.objectives]
        return names + [c.name for c in self.outcome_constraints if c.name not in names]

    def takes(self, inst: InstrumentSpec) -> list[str]:
        """The campaign's parameters ``inst`` is sent, in the campaign's order."""
        return [p.name for p in self.parameters if inst.parameters is None or p.name in inst.parameters]

    def steps(self) -> list[list[InstrumentSpec]]:
        """The steps a trial runs through, in the file's order: instruments that take the same
        parameters and measure the same objectives and outcome constraints are one step (any
        of their stations does it); when every instrument does the whole trial there is one step."""
        needed = self.outcome_names
        groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[InstrumentSpec]] = {}
        for inst in self.instruments:
            measured = tuple(o for o in needed if inst.outcomes is None or o in inst.outcomes)
            groups.setdefault((tuple(self.takes(inst)), measured), []).append(inst)
        return list(groups.values())


def _pool_instruments(instruments: list[InstrumentSpec]) -> list[tuple[int, Any]]:
    """``(index, table)`` of each instrument whose dataset is a ``kind: pool`` table."""
    from simulators.problems import load_problem

    out = []
    for i, inst in enumerate(instruments):
        if inst.dataset:
            sim = load_problem(None, inst.dataset)
            if sim.kind == "pool":
                out.append((i, sim))
    return out


def campaign_pool(instruments: list[InstrumentSpec], space: SearchSpace) -> tuple[dict[str, Any], ...] | None:
    """The pool of the campaign's ``kind: pool`` table, restricted to the rows inside ``space``
    (its bounds, choices and constraints) and typed as ``space`` declares; ``None`` when no
    instrument is a pool table. :func:`check_campaign` has made sure there is at most one table."""
    from simulators.problems import pool_rows

    pools = _pool_instruments(instruments)
    if not pools:
        return None
    rows = []
    for row in pool_rows(pools[0][1]) or ():
        point = {}
        for p in space.parameters:
            v = row[p.name]
            if p.type == "categorical":
                v = next((c for c in p.choices if str(c) == str(v)), v)
            else:
                try:
                    v = int(v) if p.type == "int" else float(v)
                except (TypeError, ValueError):
                    break  # a categorical table column for a numeric parameter: not in the space
            point[p.name] = v
        else:
            try:
                space.validate_point(point)
            except ValueError:
                continue
            rows.append(point)
    return tuple(rows)


def _check_pool(spec: CampaignSpec) -> list[SpecIssue]:
    """A campaign on a pool table runs on that one table: every instrument measures it, and
    some of its rows lie inside the campaign's space."""
    from simulators.problems import ProblemError

    try:
        pools = _pool_instruments(spec.instruments)
    except ProblemError:
        return []  # reported per instrument
    if not pools:
        return []
    i, sim = pools[0]
    others = [j for j, inst in enumerate(spec.instruments)
              if j != i and Path(str(inst.dataset)) != Path(str(spec.instruments[i].dataset))]
    if others:
        return [SpecIssue(f"instruments[{others[0]}]",
                          f"instrument {spec.instruments[i].name!r} is a 'kind: pool' table "
                          f"({sim.name}), so the planner picks rows of it; every instrument must "
                          "measure the same table (give them all the same 'dataset')")]
    try:
        space = SearchSpace(parameters=spec.parameters, constraints=spec.constraints)
    except (ValidationError, ValueError):
        return []  # reported elsewhere
    if not campaign_pool(spec.instruments, space):
        return [SpecIssue("parameters", f"no row of the pool table {sim.name!r} lies inside the "
                          "campaign's parameter bounds, choices and constraints; widen them to the "
                          "table's (see its dataset.yaml)")]
    return []


# The database drivers the ledger can use (synchronous SQLAlchemy dialects) and the module each
# imports; read without importing SQLAlchemy, which checking a file must not load.
_STORE_DRIVERS: dict[str, dict[str | None, str]] = {
    "sqlite": {None: "sqlite3", "pysqlite": "sqlite3"},
    "postgresql": {None: "psycopg2", "psycopg2": "psycopg2", "psycopg": "psycopg", "pg8000": "pg8000"},
    "mysql": {None: "MySQLdb", "mysqldb": "MySQLdb", "pymysql": "pymysql"},
}
_URL = re.compile(r"^(?P<dialect>[A-Za-z0-9]+)(?:\+(?P<driver>[A-Za-z0-9_]+))?://(?P<rest>.*)$", re.S)


def check_store_url(url: str) -> str:
    """``url`` when the ledger can be kept there; ``ValueError`` saying what to write otherwise."""
    m = _URL.match(url.strip())
    if not m:
        raise ValueError(f"cannot read the store URL {url!r}; write e.g. 'sqlite:///runs/ledger.sqlite' "
                         "or 'postgresql://user@host/db'")
    dialect, driver, rest = m["dialect"].lower(), m["driver"], m["rest"]
    drivers = _STORE_DRIVERS.get(dialect)
    if drivers is None or (driver is not None and driver.lower() not in drivers):
        known = [f"{d}+{k}" if k else d for d, ks in _STORE_DRIVERS.items() for k in ks]
        raise ValueError(f"unknown database driver {m.group(0).split('://')[0]!r}; use one of {known}")
    module = drivers[driver.lower() if driver else None]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"the driver module {module!r} for {dialect!r} is not installed; "
                         f"install it (pip install {module.lower()}) or use a sqlite:/// file")
    if dialect == "sqlite" and rest.split("?")[0] in ("", "/:memory:", "/") or "mode=memory" in rest:
        raise ValueError("an in-memory SQLite ledger is lost with the process, and a crash loses the "
                         "campaign; give a file, e.g. 'sqlite:///runs/ledger.sqlite', or leave 'store' out")
    return url


# Attributes of ophyd's Device and Signal classes (listed here so that checking a file does not
# import ophyd): a parameter or outcome of that name would shadow them on the device.
_DEVICE_ATTRIBUTES = frozenset("""
OphydAttrList SUB_ACQ_DONE SUB_META SUB_SETPOINT SUB_SETPOINT_META SUB_VALUE add_instantiation_callback
alarm_severity alarm_status as_string attr_name check_value clear_sub component_names
configuration_attrs configure connected connection_timeout describe describe_configuration destroy
dotted_name enum_strs event_types get get_device_tuple get_instantiated_signals get_setpoint
high_limit hints kind lazy_wait_for_connection limits low_limit metadata metadata_keys name parent
pause precision put put_complete pvname read read_access read_attrs read_configuration report resume
root set set_default_timeout set_defaults setpoint setpoint_alarm_severity setpoint_alarm_status
setpoint_pvname setpoint_ts signal_names source_name stage stop subscribe subscriptions summary
timeout timestamp tolerance trigger trigger_signals unstage unsubscribe unsubscribe_all use_limits
value wait_for_connection walk_components walk_signals walk_subdevice_classes walk_subdevices
write_access write_timeout
""".split())

# Ranges of planner options the planners' signatures cannot say (their types are read from the
# source's defaults): a small table rather than importing torch to ask the planner.
_OPTION_MINIMUM: dict[str, dict[str, int]] = {
    "bo": {"initial_trials": 1, "num_restarts": 1, "raw_samples": 1, "mc_samples": 1,
           "max_categorical_combinations": 1, "maxiter": 1},
}


class _YamlRefused(yaml.YAMLError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class _CampaignLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (a "billion laughs" file expands to gigabytes),
    nesting deeper than ``MAX_DEPTH`` (a deep file is a RecursionError) and duplicate keys
    (YAML lets the second win silently: a second ``budget:`` ran more trials)."""

    MAX_DEPTH = 20

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _YamlRefused(event.start_mark.line + 1, f"the alias *{event.anchor} is not allowed in a "
                               "campaign file; write the value out where it is used")
        self._depth += 1
        try:
            if self._depth > self.MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _YamlRefused(mark.line + 1, f"nested deeper than {self.MAX_DEPTH} levels; "
                                   "a campaign file needs only a few, flatten it")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports an unhashable key
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _YamlRefused(line, f"the key {key!r} appears twice (lines {seen[key]} and {line}); "
                                   "YAML would keep only the last, so keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _non_finite(data: Any, path: str = "") -> list[SpecIssue]:
    """Every number in the file that is NaN or infinite: no field of a campaign takes one."""
    if isinstance(data, float) and not math.isfinite(data):
        return [SpecIssue(path, f"{data} is not a finite number; write a finite one")]
    if isinstance(data, dict):
        return [i for k, v in data.items() for i in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(data, list):
        return [i for n, v in enumerate(data) for i in _non_finite(v, f"{path}[{n}]")]
    return []


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a campaign file: where, what, and what to write instead."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<file>'}: {self.message}"


class CampaignError(ValueError):
    """A campaign file cannot be used; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[SpecIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  - {i}" for i in issues)
        super().__init__(f"{source}: {len(issues)} problem(s) in the campaign file:\n{lines}")


_FIXES = {
    "missing": "this field is required; add it",
    "extra_forbidden": "unknown field; remove it or check its spelling",
    "union_tag_not_found": "say which kind it is with 'type: float', 'type: int' or 'type: categorical'",
    "union_tag_invalid": "'type' must be float, int or categorical",
    "float_parsing": "write a number",
    "float_type": "write a number",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "int_from_float": "write a whole number",
    "string_type": "write text",
    "list_type": "write a list (one '- item' per line)",
    "dict_type": "write a mapping (key: value lines)",
    "model_type": "write a mapping (key: value lines)",
    "model_attributes_type": "write a mapping (key: value lines)",
    "too_short": "the list is empty; give at least one entry",
    "bool_parsing": "write true or false",
}


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("float", "int", "categorical", "function-after[_check_bounds(), FloatParameter]"):
            continue  # the discriminated union's branch name is noise to a user
        elif str(part).startswith(("function-", "union[", "str", "dict[", "LinearConstraint")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _issues_from_validation(err: ValidationError) -> list[SpecIssue]:
    issues = []
    seen = set()
    for e in err.errors():
        path = _path(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        fix = _FIXES.get(e["type"])
        if e["type"] == "too_short" and (e.get("ctx") or {}).get("min_length", 1) > 1:
            fix = (f"give at least {e['ctx']['min_length']} entries "
                   f"({'a choice needs two to choose from' if path.endswith('choices') else 'too few'})")
        if fix and e["type"] not in ("value_error",):
            got = e.get("input")
            shown = f" (got {got!r})" if e["type"] != "missing" and not isinstance(got, dict | list) else ""
            msg = f"{fix}{shown}"
        key = (path, msg)
        if key not in seen:
            seen.add(key)
            issues.append(SpecIssue(path, msg))
    return issues


@dataclass
class _Fields:
    """What the cross-field checks read. Built from a valid ``CampaignSpec``, or from a file
    whose fields did not all validate: each part, and each item of a list, is validated alone,
    and a part that fails is ``None`` (its problem is already reported), so one bad field hides
    no other problem. Names are kept as written even where the rest of their item is bad, so
    that a constraint on a parameter with a bad bound is not also called unknown."""

    parameters: list[Parameter | None]
    parameter_names: list[str | None] | None  # None: 'parameters' is not even a list
    constraints: list[LinearConstraint | None]
    objectives: list[Objective | None]
    objective_names: list[str | None]
    outcome_constraints: list[OutcomeConstraint | None]
    planner: PlannerSpec | None
    instruments: list[InstrumentSpec | None]
    instrument_names: list[str | None]
    safety_limits: dict[str, SafetyLimit | None]
    safety_rules: list[LinearConstraint | None]
    safety_forbidden: list[LinearConstraint | None] = field(default_factory=list)
    safety_allowed: dict[str, Any] = field(default_factory=dict)
    safety_max_step: dict[str, Any] = field(default_factory=dict)
    safety_rate: Any = None

    @classmethod
    def of(cls, spec: CampaignSpec) -> _Fields:
        return cls(list(spec.parameters), [p.name for p in spec.parameters], list(spec.constraints),
                   list(spec.objectives), [o.name for o in spec.objectives], list(spec.outcome_constraints),
                   spec.planner, list(spec.instruments), [i.name for i in spec.instruments],
                   dict(spec.safety.limits), list(spec.safety.rules), list(spec.safety.forbidden),
                   dict(spec.safety.allowed), dict(spec.safety.max_step), spec.safety.max_trials_per_hour)

    @classmethod
    def partial(cls, data: dict[str, Any]) -> _Fields:
        def items(raw: Any, kind: Any) -> list[Any]:
            return [_valid(kind, item) for item in raw] if isinstance(raw, list) else []

        def names(raw: Any) -> list[str | None]:
            return [item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else None
                    for item in raw] if isinstance(raw, list) else []

        objectives = _objectives_shorthand(data.get("objectives"))
        safety = data.get("safety") if isinstance(data.get("safety"), dict) else {}
        limits = safety.get("limits") if isinstance(safety.get("limits"), dict) else {}
        parameters = data.get("parameters")
        return cls(
            parameters=items(parameters, Parameter),
            parameter_names=names(parameters) if isinstance(parameters, list) else None,
            constraints=items(data.get("constraints"), Constraint),
            objectives=items(objectives, Objective),
            objective_names=names(objectives),
            outcome_constraints=items(data.get("outcome_constraints"), OutcomeBound),
            planner=_valid(PlannerSpec, data.get("planner", {})),
            instruments=items(data.get("instruments"), InstrumentSpec),
            instrument_names=names(data.get("instruments")),
            safety_limits={str(k): _valid(SafetyLimit, v) for k, v in limits.items()},
            safety_rules=items(safety.get("rules"), Constraint),
            safety_forbidden=items(safety.get("forbidden"), Constraint),
            safety_allowed=safety.get("allowed") if isinstance(safety.get("allowed"), dict) else {},
            safety_max_step=safety.get("max_step") if isinstance(safety.get("max_step"), dict) else {},
            safety_rate=safety.get("max_trials_per_hour"),
        )


def _valid(kind: Any, value: Any) -> Any:
    """``value`` validated as ``kind``, or ``None`` where it is not valid."""
    try:
        return TypeAdapter(kind).validate_python(value)
    except (ValidationError, ValueError, TypeError):
        return None


def check_campaign(spec: CampaignSpec | _Fields, base_dir: Path | None = None) -> list[SpecIssue]:
    """Checks that span fields: names that must agree across the file, planner options, and
    that each instrument's simulator, dataset or device factory exists."""
    f = spec if isinstance(spec, _Fields) else _Fields.of(spec)
    issues: list[SpecIssue] = []
    if f.planner is not None:
        issues += _check_planner_options(f.planner)
    names = f.parameter_names
    known = [n for n in names or [] if n is not None]
    for i, n in enumerate(names or []):
        if n is not None and n in names[:i]:
            issues.append(SpecIssue(f"parameters[{i}].name", f"{n!r} is used twice; rename one"))
    by_name = {p.name: p for p in f.parameters if p is not None}
    if names is not None:
        for i, c in enumerate(f.constraints):
            for n in c.coefficients if c is not None else ():
                if n not in known:
                    issues.append(SpecIssue(f"constraints[{i}]",
                                            f"names unknown parameter {n!r}; known parameters: {known}"))
                elif n in by_name and (by_name[n].type != "float" or getattr(by_name[n], "log_scale", False)):
                    issues.append(SpecIssue(f"constraints[{i}]",
                                            f"{n!r} is not a linear-scale float; linear constraints take "
                                            "float parameters without log_scale"))
        for i, c in enumerate(f.safety_rules):
            for n in c.coefficients if c is not None else ():
                if n not in known:
                    issues.append(SpecIssue(f"safety.rules[{i}]", f"names unknown parameter {n!r}; known: {known}"))
        for n, lim in f.safety_limits.items():
            if n not in known:
                issues.append(SpecIssue(f"safety.limits.{n}", f"unknown parameter {n!r}; known: {known}"))
            elif lim is not None and lim.min is not None and lim.max is not None and lim.min > lim.max:
                issues.append(SpecIssue(f"safety.limits.{n}", f"min {lim.min} is above max {lim.max}; swap them"))
        issues += _check_envelope(f, known, by_name)
    issues += _check_device_names(f)
    objective_names = f.objective_names
    for i, n in enumerate(objective_names):
        if n is not None and n in objective_names[:i]:
            issues.append(SpecIssue(f"objectives[{i}].name", f"objective {n!r} is listed twice"))
    needed = [n for n in objective_names if n is not None]
    needed += [c.name for c in f.outcome_constraints if c is not None and c.name not in needed]
    measured_by: dict[str, list[str]] = {}
    for i, inst in enumerate(f.instruments):
        if inst is None:
            continue
        where = f"instruments[{i}]"
        if isinstance(inst.simulator, MappedSimulator) or inst.emulator is not None:
            from orchestrator.rehearsal import check_rehearsal

            found, rehearsed = check_rehearsal(inst, where, f, needed, base_dir)
            issues += found
            if rehearsed is None:
                continue
            measured = rehearsed
        elif inst.simulator or inst.dataset:
            from simulators.problems import ProblemError, load_problem

            dataset = inst.dataset
            if dataset and base_dir is not None and not Path(dataset).is_absolute() \
                    and (base_dir / dataset).exists():
                dataset = str(base_dir / dataset)
                inst.dataset = dataset  # relative to the campaign file, as a user reads it
            try:
                sim = load_problem(inst.simulator, dataset)
            except ProblemError as exc:
                issues.append(SpecIssue(f"{where}.{'dataset' if inst.dataset else 'simulator'}", str(exc)))
                continue
            measured = inst.outcomes or sim.outcomes
            unknown = [o for o in measured if o not in sim.outcomes]
            if unknown:
                issues.append(SpecIssue(f"{where}.outcomes", f"{unknown} are not measured by "
                                        f"{sim.name}; it measures {sim.outcomes}"))
            sim_params = [p.name for p in sim.parameters]
            missing = [p for p in sim_params if p not in known]
            extra = [p for p in known if p not in sim_params]
            if names is not None and None not in names and (missing or extra):
                issues.append(SpecIssue("parameters", f"instrument {inst.name!r} ({sim.name}) takes "
                                        f"parameters {sim_params}; the campaign "
                                        + (f"lacks {missing}" if missing else "")
                                        + (" and " if missing and extra else "")
                                        + (f"has unknown {extra}" if extra else "")))
        elif inst.kind == "manual":
            measured = inst.outcomes or []
        elif inst.epics is not None:
            measured = inst.outcomes or []
            declared = list(inst.epics.parameters)
            missing = [p for p in known if p not in declared and (inst.parameters is None or p in inst.parameters)]
            extra = [p for p in declared if p not in known]
            if names is not None and None not in names and missing:
                issues.append(SpecIssue(f"{where}.epics.parameters", f"campaign parameters {missing} have no "
                                        f"setpoint PV; add e.g. {missing[0]}: {{setpoint: 'PREFIX:{missing[0]}', "
                                        "put_complete: true}"))
            if names is not None and None not in names and extra:
                issues.append(SpecIssue(f"{where}.epics.parameters", f"{extra} are not parameters of the "
                                        f"campaign (it has {known}); remove them or fix the names"))
        else:
            measured = inst.outcomes or []
            issues += _check_device(f"{where}.device", inst.device or "")
        issues += _check_units_and_interlocks(where, inst, measured)
        measured_by[inst.name] = list(measured)
        unknown = [p for p in inst.parameters or [] if p not in known]
        if names is not None and None not in names and unknown:
            issues.append(SpecIssue(f"{where}.parameters", f"{unknown} are not parameters of the campaign "
                                    f"(it has {known}); name the ones this instrument takes"))
    issues += _check_steps(f, needed, objective_names, known if names is not None and None not in names
                           else None, measured_by)
    if not issues and isinstance(spec, CampaignSpec):  # only on a file that is otherwise sound
        issues += _check_pool(spec)
    if isinstance(spec, CampaignSpec):
        from orchestrator.approval import ApprovalRule

        issues += _check_rotation(spec)
        for i, text in enumerate(spec.approval.rules):
            why = ApprovalRule.parse(text).names_known([p.name for p in spec.parameters], spec.outcome_names)
            if why:
                issues.append(SpecIssue(f"approval.rules[{i}]", why))
    inst_names = f.instrument_names
    for i, n in enumerate(inst_names):
        if n is not None and n in inst_names[:i]:
            issues.append(SpecIssue(f"instruments[{i}].name", f"instrument name {n!r} is used twice"))
    return issues


def _check_steps(f: _Fields, needed: list[str], objective_names: list[str | None], known: list[str] | None,
                 measured_by: dict[str, list[str]]) -> list[SpecIssue]:
    """Every objective and outcome constraint is measured by some instrument, every parameter is
    taken by some instrument, and instruments that split a trial into steps are ones the flow
    can run as steps (no person among them, yet)."""
    issues = []
    insts = [i for i in f.instruments if i is not None]
    if not insts or len(insts) != len(f.instruments) or len(measured_by) < len({i.name for i in insts}):
        return issues  # an instrument that could not be read is reported on its own
    for n in needed:
        if not any(n in m for m in measured_by.values()):
            kind = "objective" if n in objective_names else "outcome constraint"
            issues.append(SpecIssue(
                f"objectives[{objective_names.index(n)}].name" if n in objective_names else "outcome_constraints",
                f"{kind} {n!r} is measured by no instrument (they measure {measured_by}); name one of "
                f"those, or add {n!r} to the 'outcomes' of the instrument that measures it"))
    if known is None:
        return issues
    for j, p in enumerate(known):
        if not any(i.parameters is None or p in i.parameters for i in insts):
            issues.append(SpecIssue(f"parameters[{j}]", f"parameter {p!r} is taken by no instrument; add it "
                                    "to the 'parameters' of the instrument that sets it (an instrument "
                                    "without 'parameters' takes every one)"))
    signatures = {(tuple(p for p in known if i.parameters is None or p in i.parameters),
                   tuple(o for o in needed if o in measured_by.get(i.name, []))) for i in insts}
    if len(signatures) > 1:
        for k, inst in enumerate(f.instruments):
            if inst.kind == "manual":
                issues.append(SpecIssue(f"instruments[{k}].kind", "the instruments split each trial into "
                                        "steps (they take or measure different things), and a 'kind: manual' "
                                        "instrument cannot be a step yet; give it every parameter and outcome, "
                                        "or use a device for this step"))
            elif not inst.parameters and inst.parameters is not None and not measured_by.get(inst.name):
                issues.append(SpecIssue(f"instruments[{k}]", f"instrument {inst.name!r} takes no parameter and "
                                        "measures no objective or outcome constraint; give it 'parameters' or "
                                        "'outcomes', or remove it"))
    return issues


def _check_rotation(spec: CampaignSpec) -> list[SpecIssue]:
    """A station is taken out of rotation before its failures alone can end the campaign: its
    failures count towards ``budget.max_consecutive_failures`` until it is taken out, so a larger
    ``out_of_rotation_after`` would let one bad station stop every good one."""
    limit = spec.budget.max_consecutive_failures
    return [SpecIssue(f"instruments[{i}].out_of_rotation_after",
                      f"{inst.out_of_rotation_after} is more than budget.max_consecutive_failures ({limit}): "
                      f"the campaign would end before station(s) {inst.stations} are taken out of rotation; "
                      f"write out_of_rotation_after: {limit} or less, or raise max_consecutive_failures")
            for i, inst in enumerate(spec.instruments)
            if inst.out_of_rotation_after is not None and inst.out_of_rotation_after > limit]


def _check_envelope(f: _Fields, known: list[str], by_name: dict[str, Parameter]) -> list[SpecIssue]:
    """The envelope's newer rules (forbidden, allowed, max_step, max_trials_per_hour), typed
    against the parameters and instruments they name, each issue saying what to write."""
    issues: list[SpecIssue] = []
    for i, c in enumerate(f.safety_forbidden):
        if c is None:
            continue
        where = f"safety.forbidden[{i}]"
        if c.op == "==":
            issues.append(SpecIssue(where, "a forbidden region is an inequality ('x1 + x2 >= 12'); '==' forbids "
                                    "a single value only, write <= or >="))
        for n in c.coefficients:
            if n not in known:
                issues.append(SpecIssue(where, f"names unknown parameter {n!r}; known: {known}"))
            elif n in by_name and by_name[n].type != "float":
                issues.append(SpecIssue(where, f"{n!r} is a {by_name[n].type} parameter; a forbidden region is "
                                        "a linear inequality over float parameters (use 'allowed' for choices)"))
    for n, choices in f.safety_allowed.items():
        where = f"safety.allowed.{n}"
        p = by_name.get(n)
        if n not in known:
            issues.append(SpecIssue(where, f"unknown parameter {n!r}; known: {known}"))
        elif p is None:
            continue  # the parameter's own problem is reported
        elif p.type != "categorical":
            issues.append(SpecIssue(where, f"{n!r} is a {p.type} parameter; 'allowed' limits categorical "
                                    f"parameters, write safety.limits.{n}: {{min: .., max: ..}} instead"))
        elif not isinstance(choices, list) or not choices:
            issues.append(SpecIssue(where, f"write a non-empty list of {n!r}'s choices that may run, "
                                    f"e.g. {p.choices[:1]}"))
        else:
            bad = [c for c in choices if not any(type(c) is type(k) and c == k for k in p.choices)]
            if bad:
                issues.append(SpecIssue(where, f"{bad} are not choices of {n!r}; its choices are {p.choices}"))
    for n, step in f.safety_max_step.items():
        where = f"safety.max_step.{n}"
        p = by_name.get(n)
        if n not in known:
            issues.append(SpecIssue(where, f"unknown parameter {n!r}; known: {known}"))
        elif p is not None and p.type == "categorical":
            issues.append(SpecIssue(where, f"{n!r} is categorical: it has no step size; limit its choices "
                                    f"with safety.allowed.{n} instead"))
        if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step) or step <= 0:
            issues.append(SpecIssue(where, f"write a positive number, the largest change of {n!r} between "
                                    f"consecutive trials on one station (got {step!r})"))
    rate = f.safety_rate
    inst_names = [n for n in f.instrument_names if n is not None]
    if rate is not None:
        per = rate.items() if isinstance(rate, dict) else [(None, rate)]
        for name, r in per:
            where = "safety.max_trials_per_hour" + (f".{name}" if name is not None else "")
            if name is not None and name not in inst_names:
                issues.append(SpecIssue(where, f"unknown instrument {name!r}; the campaign's instruments "
                                        f"are {inst_names}"))
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                issues.append(SpecIssue(where, f"write a whole number of trials of at least 1 per hour "
                                        f"per station (got {r!r})"))
    return issues


def _check_units_and_interlocks(where: str, inst: InstrumentSpec, measured: list[str]) -> list[SpecIssue]:
    """An instrument's ``units`` name outcomes it measures, once; its ``suspend_when`` is for a
    kind whose RunEngine drives real hardware, one entry per PV."""
    issues = []
    if inst.suspend_when and inst.kind not in INTERLOCK_KINDS:
        issues.append(SpecIssue(f"{where}.suspend_when", f"an interlock watches an EPICS PV beside real "
                                f"hardware: it is for 'kind: epics' or 'kind: ophyd', not {inst.kind!r}; "
                                "remove it (a simulator has no temperature to watch)"))
    pvs = [i.pv for i in inst.suspend_when]
    for j, pv in enumerate(pvs):
        if pv in pvs[:j]:
            issues.append(SpecIssue(f"{where}.suspend_when[{j}].pv", f"{pv!r} is watched twice; give its "
                                    "allowed range once, with both 'min' and 'max'"))
    for o, u in inst.units.items():
        declared = inst.epics.results[o].units if inst.epics is not None and o in inst.epics.results else None
        if o not in measured:
            issues.append(SpecIssue(f"{where}.units.{o}", f"instrument {inst.name!r} does not measure {o!r} "
                                    f"(it measures {measured}); name one of those"))
        elif declared is not None and declared != u:
            issues.append(SpecIssue(f"{where}.units.{o}", f"says {u!r} but epics.results.{o}.units says "
                                    f"{declared!r}; give the units once"))
    return issues


def _check_device_names(f: _Fields) -> list[SpecIssue]:
    """Parameters and outcomes become attributes of the instrument's ophyd device, named
    ``name.replace('-', '_')`` (orchestrator.flows, simulators.devices): none may be an attribute
    ophyd's Device or Signal already has, and no two may become the same attribute."""
    named = [(f"parameters[{i}].name", n) for i, n in enumerate(f.parameter_names or []) if n is not None]
    named += [(f"objectives[{i}].name", n) for i, n in enumerate(f.objective_names) if n is not None]
    named += [(f"outcome_constraints[{i}]", c.name) for i, c in enumerate(f.outcome_constraints) if c is not None]
    for i, inst in enumerate(f.instruments):
        named += [(f"instruments[{i}].outcomes[{j}]", o) for j, o in enumerate(inst.outcomes or [])] if inst else []
    issues, owner = [], {}
    for where, n in named:
        attr = n.replace("-", "_")
        if attr in _DEVICE_ATTRIBUTES:
            issues.append(SpecIssue(where, f"{n!r} is an attribute of every ophyd device or signal, so the "
                                    f"instrument's device cannot have a signal of that name; rename it, "
                                    f"e.g. {n + '_value'!r}"))
        elif attr in owner and owner[attr][1] != n:
            issues.append(SpecIssue(where, f"{n!r} and {owner[attr][1]!r} ({owner[attr][0]}) become the same "
                                    f"device attribute {attr!r} ('-' is written '_'); rename one"))
        owner.setdefault(attr, (where, n))
    return issues


def _check_planner_options(planner: PlannerSpec) -> list[SpecIssue]:
    options = planner_options(planner.name)
    if options is None:  # it takes any keyword
        return []
    issues = [SpecIssue(f"planner.options.{k}", f"planner {planner.name!r} has no option {k!r}; "
                        f"its options are {options or 'none'}")
              for k in planner.options if k not in options]
    defaults = _option_defaults(planner.name)
    for k, v in planner.options.items():
        if k not in options:
            continue
        where, d = f"planner.options.{k}", defaults.get(k)
        if isinstance(d, bool) and not isinstance(v, bool):
            issues.append(SpecIssue(where, f"write true or false (got {v!r})"))
        elif isinstance(d, int) and not isinstance(d, bool) and (isinstance(v, bool) or not isinstance(v, int)):
            issues.append(SpecIssue(where, f"write a whole number (got {v!r})"))
        elif isinstance(d, float) and (isinstance(v, bool) or not isinstance(v, int | float)):
            issues.append(SpecIssue(where, f"write a number (got {v!r})"))
        else:
            low = _OPTION_MINIMUM.get(planner.name, {}).get(k)
            if low is not None and isinstance(v, int | float) and v < low:
                issues.append(SpecIssue(where, f"must be at least {low} (got {v!r})"))
    return issues


def _option_defaults(name: str) -> dict[str, Any]:
    """The literal defaults of a planner's ``__init__`` keywords, read from its source."""
    module, cls = PLANNERS[name].split(":")
    init = _source_init(module, cls)
    if init is None:
        return {}
    a = init.args
    positional = a.posonlyargs + a.args
    pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults, strict=True))
    pairs += [(x, d) for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None]
    out = {}
    for arg, default in pairs:
        try:
            out[arg.arg] = ast.literal_eval(default)
        except ValueError:
            continue
    return out


def planner_options(name: str) -> list[str] | None:
    """The options (keyword arguments) a planner takes; ``None`` when it takes any keyword.

    Read from the planner's source where it defines ``__init__`` itself, so that checking a
    file does not import torch, BoTorch or Ax; otherwise from the imported class.
    """
    module, cls = PLANNERS[name].split(":")
    init = _source_init(module, cls)
    if init is None and _source_bases(module, cls) == ["Planner"]:
        return []  # Planner.__init__ refuses every option
    if init is not None:
        a = init.args
        if a.kwarg is not None:
            return None
        return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "problem", "seed")]
    params = inspect.signature(getattr(importlib.import_module(module), cls).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n in params if n not in ("self", "problem", "seed")]


def _module_source(module: str) -> ast.Module | None:
    """The parsed source of ``module``, found without running it (its parent packages do run)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not (spec.origin or "").endswith(".py"):
        return None
    try:
        text = Path(spec.origin).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    for attempt in range(3):
        try:
            return ast.parse(text)
        except SyntaxError:
            return None
        except SystemError:
            # CPython 3.11's parser keeps its recursion depth in shared state: another thread parsing
            # at the same moment (torch.jit.script reads source with ast when botorch loads in a
            # campaign's thread) makes it raise "AST constructor recursion depth mismatch".
            if attempt == 2:
                raise
            time.sleep(0.01)
    return None


def _source_bases(module: str, cls: str) -> list[str] | None:
    """The names of the base classes of ``cls`` as its source writes them (``None``: not found)."""
    tree = _module_source(module)
    for node in tree.body if tree is not None else ():
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
    return None


def _source_init(module: str, cls: str) -> ast.FunctionDef | None:
    tree = _module_source(module)
    for node in tree.body if tree is not None else ():
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"
                         and not f.decorator_list), None)
    return None


def _check_device(where: str, device: str) -> list[SpecIssue]:
    """That an instrument's ``device: package.module:factory`` names a callable that exists.

    The module is found (``importlib.util.find_spec``) and its source read, not run: a device
    module imports ophyd and may reach for hardware when imported, and validating a file should
    do neither. Only where the source cannot say (the name is assigned or imported, not defined
    with ``def`` or ``class``) is the module imported to look.
    """
    module, sep, attr = device.partition(":")
    if not sep or not module or not attr.isidentifier():
        return [SpecIssue(where, f"write it as package.module:factory, e.g. mypackage.lab:make_reactor "
                                 f"(got {device!r})")]
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError as exc:
        spec, missing = None, exc.name
    except Exception as exc:  # noqa: BLE001 - a parent package that fails on import: say how
        return [SpecIssue(where, f"importing the package of {module!r} failed ({type(exc).__name__}: {exc}); "
                                 "fix that package or name another module")]
    else:
        missing = module
    if spec is None:
        return [SpecIssue(where, f"no module {missing!r} can be found, so {module!r} cannot be imported; "
                                 "install the package that holds it, add its folder to PYTHONPATH, "
                                 "or fix the name")]
    found = _defined_in_source(module, attr)
    if found is True:
        return []
    if found is False:
        tree = _module_source(module)
        defined = sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)) if tree else []
        return [SpecIssue(where, f"module {module!r} has no {attr!r}; name one of its factories "
                                 f"{defined} or define {attr!r} there")]
    try:
        obj = getattr(importlib.import_module(module), attr)
    except AttributeError:
        return [SpecIssue(where, f"module {module!r} has no {attr!r}; define it there or fix the name")]
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module is their input
        return [SpecIssue(where, f"importing {module!r} failed ({type(exc).__name__}: {exc}); fix the module")]
    if not callable(obj):
        return [SpecIssue(where, f"{module}:{attr} is a {type(obj).__name__}, not a factory; name a function "
                                 "that returns the ophyd device")]
    return []


def _defined_in_source(module: str, attr: str) -> bool | None:
    """``True``: the source defines ``attr`` with ``def`` or ``class`` at the top level; ``False``:
    it binds no such name anywhere; ``None``: the source cannot say (import to look)."""
    tree = _module_source(module)
    if tree is None:
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == attr:
            return True
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) \
                and node.name in (attr, "__getattr__"):
            return None
        if isinstance(node, ast.Name) and node.id == attr and isinstance(node.ctx, ast.Store):
            return None
        if isinstance(node, ast.ImportFrom | ast.Import) and any(
                (a.asname or a.name.split(".")[0]) in (attr, "*") for a in node.names):
            return None
        if isinstance(node, ast.Global | ast.Nonlocal) and attr in node.names:
            return None
    return False


def parse_campaign(data: Any, source: str = "<campaign>", base_dir: Path | None = None) -> CampaignSpec:
    """Validate a campaign given as plain data; raise ``CampaignError`` listing every problem."""
    bad_numbers = _non_finite(data)
    try:
        spec = _parse_campaign(data, source, base_dir)
    except CampaignError as err:
        seen = {i.path for i in bad_numbers}
        raise CampaignError(source, bad_numbers + [i for i in err.issues if i.path not in seen]) from None
    if bad_numbers:
        raise CampaignError(source, bad_numbers)
    return spec


def _parse_campaign(data: Any, source: str, base_dir: Path | None) -> CampaignSpec:
    if not isinstance(data, dict):
        raise CampaignError(source, [SpecIssue("", "the file must be a YAML mapping (name:, parameters:, ...)")])
    try:
        spec = CampaignSpec.model_validate(data)
    except ValidationError as err:
        # The checks across fields run on whatever did validate, so a file's problems come in one
        # report, not in rounds.
        issues = _issues_from_validation(err)
        seen = {(i.path, i.message) for i in issues}
        issues += [i for i in check_campaign(_Fields.partial(data), base_dir) if (i.path, i.message) not in seen]
        raise CampaignError(source, issues) from None
    issues = check_campaign(spec, base_dir)
    if issues:
        raise CampaignError(source, issues)
    return spec


def load_campaign(path: str | Path) -> CampaignSpec:
    """Read and validate a campaign YAML file."""
    p = Path(path)
    if not p.is_file():
        raise CampaignError(str(p), [SpecIssue("", f"no such file: {p}; give the path of a campaign YAML file")])
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_CampaignLoader)  # noqa: S506 - a SafeLoader
    except _YamlRefused as exc:
        raise CampaignError(str(p), [SpecIssue(f"line {exc.line}", exc.message)]) from None
    except UnicodeDecodeError:
        raise CampaignError(str(p), [SpecIssue("", "not a text file (not UTF-8); give a campaign YAML file")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CampaignError(str(p), [SpecIssue(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    return parse_campaign(data, str(p), base_dir=p.parent)
