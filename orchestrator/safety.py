"""The safety gate: nothing reaches an instrument without passing the campaign's envelope."""

from __future__ import annotations

from typing import Any

from orchestrator.spec import SafetySpec
from planners.space import SearchSpace


def veto_reason(parameters: dict[str, Any], space: SearchSpace, safety: SafetySpec) -> str | None:
    """Why ``parameters`` must not run, or ``None`` if they may.

    Checks that every value is legal in the search space (bounds, choices,
    linear constraints), then the envelope's per-parameter limits and rules.
    """
    try:
        space.validate_point(parameters)
    except ValueError as exc:
        return f"outside the search space: {exc}"
    for name, limit in safety.limits.items():
        value = float(parameters[name])
        if limit.min is not None and value < limit.min:
            return f"safety limit: {name}={value:g} is below its minimum {limit.min:g}"
        if limit.max is not None and value > limit.max:
            return f"safety limit: {name}={value:g} is above its maximum {limit.max:g}"
    for rule in safety.rules:
        if not rule.satisfied(parameters):
            return f"safety rule broken: {rule}"
    return None
