"""The safety gate: nothing reaches an instrument without passing the campaign's envelope.

:func:`check_point` is the one gate. It takes whatever a proposal, an operator
or a hand-edited ledger holds, and either returns the parameters to send, each
converted once to its declared type, or says why the point must not run. It
never raises: a value it cannot check is a veto.

- Exactly the declared parameters: a missing one, or any other key (``heater:
  5000``), is a veto.
- Types: a float parameter takes a finite int or float (not a bool, a string or
  None); an int parameter an int, or a float with no fractional part; a
  categorical one of its choices, of the choice's own type (``True`` is not
  ``1``, ``"1"`` is not ``1``).
- The search space's bounds allow round-off of 1e-9 of the range (a planner's
  decoding), and the value sent is clamped into them; its linear constraints
  allow 1e-6 of the rule's own scale (``|rhs| + sum |a_i x_i|``: what an
  optimiser's constraint solver leaves), so ``0.000001*x2 <= 0.00001`` is as
  strict as ``x2 <= 10`` (an absolute 1e-6 let x2 = 11 through).
- The envelope's limits and rules are hard: no tolerance at all. So are its forbidden
  regions (a point meeting ``x1 + x2 >= 12`` exactly is inside) and its allowed choices.

:func:`check_dispatch` is the gate's second half, for the rules that need the instrument
station's history (``max_step``, ``max_trials_per_hour``): the dispatcher asks it right
before a trial is started on a station, with what the ledger says ran there. It never
raises either: a rule it cannot evaluate refuses, naming the rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.spec import SafetySpec
from planners.space import (
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    LinearConstraint,
    SearchSpace,
)

#: round-off a planner's decoding may leave, relative to a bound's range
ROUND_OFF = 1e-9
#: what an optimiser may leave of a linear constraint, relative to the constraint's scale
CONSTRAINT_TOL = 1e-6


def check_point(parameters: Any, space: SearchSpace, safety: SafetySpec) -> tuple[dict[str, Any] | None, str | None]:
    """``(parameters to send, None)`` when the point may run, else ``(None, why not)``. Never raises."""
    try:
        return _check(parameters, space, safety)
    except Exception as exc:  # noqa: BLE001 - the gate's promise: a point it cannot check does not run
        return None, f"the safety gate could not check this point ({type(exc).__name__}: {exc})"


def veto_reason(parameters: Any, space: SearchSpace, safety: SafetySpec) -> str | None:
    """Why ``parameters`` must not run, or ``None`` if they may (see :func:`check_point`)."""
    return check_point(parameters, space, safety)[1]


def _check(parameters: Any, space: SearchSpace, safety: SafetySpec) -> tuple[dict[str, Any] | None, str | None]:
    if not isinstance(parameters, dict):
        return None, f"outside the search space: a point is a mapping of parameters, not {type(parameters).__name__}"
    declared = [p.name for p in space.parameters]
    extra = sorted(str(k) for k in parameters if k not in declared)
    if extra:
        return None, f"outside the search space: {extra} are not parameters of this campaign ({declared})"
    point: dict[str, Any] = {}
    for p in space.parameters:
        if p.name not in parameters:
            return None, f"outside the search space: the point lacks parameter {p.name!r}"
        value, why = _typed(p, parameters[p.name])
        if why:
            return None, f"outside the search space: {why}"
        point[p.name] = value
    for c in space.constraints:
        lhs, scale = _lhs(c, point)
        if not _holds(c, lhs, CONSTRAINT_TOL * (abs(c.rhs) + scale)):
            return None, f"outside the search space: the point breaks constraint '{c}' ({lhs:.9g} {c.op} {c.rhs:g})"
    for name, limit in safety.limits.items():
        if name not in point:
            return None, f"safety limit on {name!r}, which is not a parameter of this campaign"
        value = float(point[name])
        if limit.min is not None and not value >= limit.min:
            return None, f"safety limit: {name}={value:g} is below its minimum {limit.min:g}"
        if limit.max is not None and not value <= limit.max:
            return None, f"safety limit: {name}={value:g} is above its maximum {limit.max:g}"
    for rule in safety.rules:
        lhs, _ = _lhs(rule, point)
        if not _holds(rule, lhs, 0.0):
            return None, f"safety rule broken: {rule} ({lhs:.9g} {rule.op} {rule.rhs:g})"
    for i, rule in enumerate(safety.forbidden):
        lhs, _ = _lhs(rule, point)
        if not math.isfinite(lhs):
            return None, f"safety.forbidden[{i}]: cannot evaluate forbidden region '{rule}' at this point"
        if _holds(rule, lhs, 0.0):
            return None, (f"safety.forbidden[{i}]: the point is inside the forbidden region '{rule}' "
                          f"({lhs:.9g} {rule.op} {rule.rhs:g})")
    for name, choices in safety.allowed.items():
        if name not in point:
            return None, f"safety.allowed.{name}: {name!r} is not a parameter of this campaign"
        v = point[name]
        if not any(type(c) is type(v) and c == v for c in choices):
            return None, f"safety.allowed.{name}: {name}={v!r} is not among the allowed choices {list(choices)}"
    return point, None


@dataclass(frozen=True)
class Refusal:
    """Why a trial may not start on a station now. ``retry_after`` (seconds) set: it must wait
    (the rate rule; another station or a later moment may take it); ``None``: never on this
    station as things stand (``max_step``, or a rule that could not be evaluated)."""

    rule: str
    reason: str
    retry_after: float | None = None

    def __str__(self) -> str:
        return self.reason


HOUR = timedelta(hours=1)


def check_dispatch(point: dict[str, Any], station: str, last_point: dict[str, Any] | None,
                   recent_starts: Iterable[datetime], safety: SafetySpec, now: datetime | None = None,
                   instrument: str | None = None) -> Refusal | None:
    """Whether ``point`` (what :func:`check_point` returned) may start on ``station`` now, given
    the parameters of the last trial started there (``None``: none yet) and the start times of
    the trials started there (those in the hour before ``now`` count). ``instrument`` names the
    station's instrument for a per-instrument ``max_trials_per_hour`` (default: ``station``).
    ``None`` when it may; never raises (a rule it cannot evaluate refuses, naming it)."""
    rule = "safety.max_step"
    try:
        for name, step in safety.max_step.items():
            rule = f"safety.max_step.{name}"
            if last_point is None:
                break
            if name not in last_point:
                continue  # the last trial did not set it (an older campaign file): nothing to compare
            delta = abs(float(point[name]) - float(last_point[name]))
            if not delta <= step:  # NaN refuses too
                return Refusal(rule, f"{rule}: {name} would change by {delta:.6g} on {station} "
                               f"(from {float(last_point[name]):.6g} to {float(point[name]):.6g}); "
                               f"at most {step:g} between consecutive trials on one station")
        rule = "safety.max_trials_per_hour"
        limit = safety.rate_limit(instrument or station)
        if limit is not None:
            now = now or datetime.now(UTC)
            since = now - HOUR
            starts = sorted(t for t in (_aware(s) for s in recent_starts) if since < t <= now)
            if len(starts) >= limit:
                # the station opens again when the oldest start that keeps it full is an hour old
                opens = starts[len(starts) - limit] + HOUR
                wait = max((opens - now).total_seconds(), 0.001)
                return Refusal(rule, f"{rule}: {station} started {len(starts)} trials in the last hour "
                               f"(at most {limit}); it may start another in {wait:.0f} s", retry_after=wait)
    except Exception as exc:  # noqa: BLE001 - the gate's promise: a rule it cannot check refuses
        return Refusal(rule, f"{rule}: could not check this point on {station} ({type(exc).__name__}: {exc})")
    return None


def _aware(t: datetime) -> datetime:
    """The ledger's times are UTC; SQLite returns them without a zone."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _typed(p: Any, v: Any) -> tuple[Any, str | None]:
    """``v`` as parameter ``p``'s type, or a reason it is not a legal value of ``p``."""
    if isinstance(p, CategoricalParameter):
        for c in p.choices:
            if type(c) is type(v) and c == v:
                return c, None
        return None, f"{p.name}={v!r} is not one of its choices {p.choices}"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None, f"{p.name}={v!r} is not a number ({type(v).__name__})"
    if isinstance(v, float) and not math.isfinite(v):
        return None, f"{p.name}={v!r} is not a finite number"
    if isinstance(p, IntParameter):
        if isinstance(v, float):
            if v != int(v):
                return None, f"{p.name}={v!r} is not a whole number"
            v = int(v)
        if not p.lower <= v <= p.upper:
            return None, f"{p.name}={v} is outside [{p.lower}, {p.upper}]"
        return int(v), None
    assert isinstance(p, FloatParameter)
    x = float(v)  # an int beyond float's range raises OverflowError: caught, a veto
    slack = ROUND_OFF * (p.upper - p.lower)
    if not p.lower - slack <= x <= p.upper + slack:
        return None, f"{p.name}={x:g} is outside [{p.lower:g}, {p.upper:g}]"
    return min(max(x, p.lower), p.upper), None


def _lhs(c: LinearConstraint, point: dict[str, Any]) -> tuple[float, float]:
    terms = [a * float(point[n]) for n, a in c.coefficients.items()]
    return math.fsum(terms), math.fsum(abs(t) for t in terms)


def _holds(c: LinearConstraint, lhs: float, tol: float) -> bool:
    if not math.isfinite(lhs):
        return False
    if c.op == "<=":
        return lhs <= c.rhs + tol
    if c.op == ">=":
        return lhs >= c.rhs - tol
    return abs(lhs - c.rhs) <= tol
