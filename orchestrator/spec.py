"""The campaign file: ``CampaignSpec`` (pydantic v2), loaded from YAML with errors a person can act on.

Every problem in the fields of a file is reported at once, each with its path
in the file (``instruments[0].timeout``) and what to write instead; the checks
that compare fields with each other (an objective no instrument measures) run
once the fields themselves are valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
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

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PLANNERS:
            raise ValueError(f"unknown planner {v!r}; choose one of {sorted(PLANNERS)}")
        return v


class InstrumentSpec(_Spec):
    """One instrument: a simulator (``simulator`` or ``dataset``) or a real ophyd ``device``.

    ``device`` is an import path ``package.module:factory``; the factory returns an
    ophyd device with one settable signal per parameter and one readable signal
    per outcome, named as in the campaign.
    """

    name: str = Field(pattern=r"^[A-Za-z_][\w-]*$")
    simulator: str | None = None
    dataset: str | None = None
    device: str | None = None
    outcomes: list[str] | None = None
    concurrency: int = Field(1, ge=1, le=64, description="identical stations working at once")
    timeout: float = Field(300.0, gt=0, description="seconds one trial may take before it is aborted")
    latency: float = Field(0.0, ge=0, description="simulated seconds per measurement")
    noise: float = Field(0.0, ge=0, description="simulated Gaussian noise (standard deviation)")
    drift: float = Field(0.0, description="simulated drift added per measurement")
    failure_rate: float = Field(0.0, ge=0, le=1)
    hang_rate: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _one_source(self) -> InstrumentSpec:
        given = [k for k in ("simulator", "dataset", "device") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'simulator: branin|hartmann6|branincurrin', "
                f"'dataset: <folder>' or 'device: package.module:factory' (got {given or 'none'})"
            )
        if self.device and not self.outcomes:
            raise ValueError("a 'device' instrument must list the 'outcomes' it measures")
        return self


class SafetyLimit(_Spec):
    min: float | None = None
    max: float | None = None


class SafetySpec(_Spec):
    """What the hardware must never do: per-parameter limits and linear rules."""

    limits: dict[str, SafetyLimit] = Field(default_factory=dict)
    rules: list[Constraint] = Field(default_factory=list)


class ApprovalSpec(_Spec):
    policy: Literal["auto"] = Field(
        "auto", description="'auto' runs every proposal that passes the safety envelope"
    )


class CampaignSpec(_Spec):
    """One optimisation campaign, as written in its YAML file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = 0
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
        # Shorthand: "- yield: maximize" items, or one mapping {yield: maximize, cost: minimize}.
        if isinstance(v, dict) and "name" not in v:
            v = [{k: g} for k, g in v.items()]
        out = []
        for o in v or []:
            if isinstance(o, dict) and len(o) == 1 and "name" not in o:
                (name, goal), = o.items()
                out.append({"name": name, "goal": goal})
            else:
                out.append(o)
        return out

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
    def outcome_names(self) -> list[str]:
        names = [o.name for o in self.objectives]
        return names + [c.name for c in self.outcome_constraints if c.name not in names]


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
        if fix and e["type"] not in ("value_error",):
            got = e.get("input")
            shown = f" (got {got!r})" if e["type"] != "missing" and not isinstance(got, dict | list) else ""
            msg = f"{fix}{shown}"
        key = (path, msg)
        if key not in seen:
            seen.add(key)
            issues.append(SpecIssue(path, msg))
    return issues


def check_campaign(spec: CampaignSpec, base_dir: Path | None = None) -> list[SpecIssue]:
    """Checks that span fields: names that must agree across the file."""
    from simulators.problems import ProblemError, load_problem

    issues: list[SpecIssue] = []
    issues += _check_planner_options(spec.planner)
    names = [p.name for p in spec.parameters]
    for i, n in enumerate(names):
        if n in names[:i]:
            issues.append(SpecIssue(f"parameters[{i}].name", f"{n!r} is used twice; rename one"))
    by_name = {p.name: p for p in spec.parameters}
    for i, c in enumerate(spec.constraints):
        for n in c.coefficients:
            if n not in by_name:
                issues.append(SpecIssue(f"constraints[{i}]",
                                        f"names unknown parameter {n!r}; known parameters: {names}"))
            elif by_name[n].type != "float" or getattr(by_name[n], "log_scale", False):
                issues.append(SpecIssue(f"constraints[{i}]",
                                        f"{n!r} is not a linear-scale float; linear constraints take "
                                        "float parameters without log_scale"))
    for where, rules in (("safety.rules", spec.safety.rules),):
        for i, c in enumerate(rules):
            for n in c.coefficients:
                if n not in by_name:
                    issues.append(SpecIssue(f"{where}[{i}]", f"names unknown parameter {n!r}; known: {names}"))
    for n, lim in spec.safety.limits.items():
        if n not in by_name:
            issues.append(SpecIssue(f"safety.limits.{n}", f"unknown parameter {n!r}; known: {names}"))
        elif lim.min is not None and lim.max is not None and lim.min > lim.max:
            issues.append(SpecIssue(f"safety.limits.{n}", f"min {lim.min} is above max {lim.max}; swap them"))
    objective_names = [o.name for o in spec.objectives]
    for i, n in enumerate(objective_names):
        if n in objective_names[:i]:
            issues.append(SpecIssue(f"objectives[{i}].name", f"objective {n!r} is listed twice"))
    try:
        SearchSpace(parameters=spec.parameters, constraints=[])
    except ValidationError:
        pass  # already reported per parameter
    needed = spec.outcome_names
    for i, inst in enumerate(spec.instruments):
        where = f"instruments[{i}]"
        if inst.simulator or inst.dataset:
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
            missing = [p for p in sim_params if p not in by_name]
            extra = [p for p in names if p not in sim_params]
            if missing or extra:
                issues.append(SpecIssue("parameters", f"instrument {inst.name!r} ({sim.name}) takes "
                                        f"parameters {sim_params}; the campaign "
                                        + (f"lacks {missing}" if missing else "")
                                        + (" and " if missing and extra else "")
                                        + (f"has unknown {extra}" if extra else "")))
        else:
            measured = inst.outcomes or []
        for n in needed:
            if n not in measured:
                kind = "objective" if n in objective_names else "outcome constraint"
                issues.append(SpecIssue(
                    f"objectives[{objective_names.index(n)}].name" if n in objective_names
                    else "outcome_constraints",
                    f"{kind} {n!r} is not measured by instrument {inst.name!r}, which measures "
                    f"{measured}; name one of those or add an instrument that measures {n!r}"))
    if not issues:
        issues += _check_pool(spec)
    inst_names = [inst.name for inst in spec.instruments]
    for i, n in enumerate(inst_names):
        if n in inst_names[:i]:
            issues.append(SpecIssue(f"instruments[{i}].name", f"instrument name {n!r} is used twice"))
    return issues


def _check_planner_options(planner: PlannerSpec) -> list[SpecIssue]:
    import importlib
    import inspect

    module, cls = PLANNERS[planner.name].split(":")
    params = inspect.signature(getattr(importlib.import_module(module), cls).__init__).parameters
    known = [n for n in params if n not in ("self", "problem", "seed")]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [SpecIssue(f"planner.options.{k}", f"planner {planner.name!r} has no option {k!r}; "
                      f"its options are {known or 'none'}")
            for k in planner.options if k not in known]


def parse_campaign(data: Any, source: str = "<campaign>", base_dir: Path | None = None) -> CampaignSpec:
    """Validate a campaign given as plain data; raise ``CampaignError`` listing every problem."""
    if not isinstance(data, dict):
        raise CampaignError(source, [SpecIssue("", "the file must be a YAML mapping (name:, parameters:, ...)")])
    try:
        spec = CampaignSpec.model_validate(data)
    except ValidationError as err:
        raise CampaignError(source, _issues_from_validation(err)) from None
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
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CampaignError(str(p), [SpecIssue("", "not a text file (not UTF-8); give a campaign YAML file")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CampaignError(str(p), [SpecIssue(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    return parse_campaign(data, str(p), base_dir=p.parent)
