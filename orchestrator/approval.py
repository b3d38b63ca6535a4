"""The approval policy: which proposals wait for a person before they may run.

``auto`` runs every proposal that passes the safety envelope; ``manual`` makes
every one wait; ``out_of_domain`` makes those wait whose out-of-domain score
(the distance from the data the model has seen, 1 ~ its typical spacing) is
above ``threshold``; ``rules`` makes those wait that match any rule, written
as a short string: ``"temperature > 150"``, ``"solvent == DMSO"``,
``"ood > 2"``, ``"predicted.yield < 10"``, ``"sd.yield > 5"``. A planner's
proposal that does not wait is approved by the system; an operator's own
trial (added by hand, re-queued) is approved by that operator. Either way the
safety envelope still decides first.

Light on purpose (no numerical libraries): the campaign file's checks use it.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
        "==": operator.eq, "!=": operator.ne}
_RULE = re.compile(r"^\s*(?P<name>[A-Za-z_][\w.-]*)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>\S.*?)\s*$")


@dataclass(frozen=True)
class ApprovalRule:
    """``name op value``: ``name`` a parameter, ``ood`` (out-of-domain score),
    ``predicted.<outcome>`` or ``sd.<outcome>`` (the model's mean and uncertainty)."""

    name: str
    op: str
    value: float | str
    text: str

    @classmethod
    def parse(cls, text: str) -> ApprovalRule:
        if not isinstance(text, str):
            raise ValueError(f"an approval rule is a string such as 'temperature > 150' (got {text!r})")
        m = _RULE.match(text)
        if not m:
            raise ValueError(f"cannot read the approval rule {text!r}; write 'NAME OP VALUE' with OP one of "
                             f"{list(_OPS)}, e.g. 'temperature > 150' or 'ood > 2'")
        raw = m["value"].strip().strip("'\"")
        try:
            value: float | str = float(raw)
            if not math.isfinite(value):
                raise ValueError
        except ValueError:
            if m["op"] not in ("==", "!="):
                raise ValueError(f"cannot read the approval rule {text!r}: it compares with {raw!r}, which is "
                                 "not a finite number; only == and != take a word (a categorical choice)") from None
            value = raw
        return cls(m["name"], m["op"], value, text.strip())

    def names_known(self, parameters: list[str], outcomes: list[str]) -> str | None:
        """Why the rule names something the campaign has not, or ``None``."""
        if self.name == "ood" or self.name in parameters:
            return None
        kind, _, outcome = self.name.partition(".")
        if kind in ("predicted", "sd") and outcome in outcomes:
            return None
        return (f"the approval rule {self.text!r} names {self.name!r}, which is none of the parameters "
                f"{parameters}, 'ood', or 'predicted.<outcome>'/'sd.<outcome>' with outcomes {outcomes}")

    def matches(self, parameters: dict[str, Any], predicted: dict[str, Any], sd: dict[str, Any],
                ood: float | None) -> bool:
        if self.name == "ood":
            x: Any = ood
        elif self.name.startswith(("predicted.", "sd.")) and self.name not in parameters:
            kind, _, outcome = self.name.partition(".")
            x = (predicted if kind == "predicted" else sd).get(outcome)
        else:
            x = parameters.get(self.name)
        if x is None:
            # unknown (no model yet): a rule on a prediction cannot clear the proposal, so it waits
            return True
        if isinstance(self.value, str):
            return _OPS[self.op](str(x), self.value)
        try:
            return bool(_OPS[self.op](float(x), self.value))
        except (TypeError, ValueError):
            return _OPS[self.op](str(x), str(self.value))


def waits_because(policy: Any, parameters: dict[str, Any], predicted: dict[str, Any] | None = None,
                  sd: dict[str, Any] | None = None, ood: float | None = None) -> str | None:
    """Why a planner's proposal must wait for a person under ``policy`` (an ``ApprovalSpec``), or
    ``None`` when it may run once the safety envelope has passed it."""
    name = policy.policy
    if name == "auto":
        return None
    if name == "manual":
        return "approval policy 'manual': every proposal waits for a person"
    if name == "out_of_domain":
        if ood is None:
            return (f"approval policy 'out_of_domain': no out-of-domain score (no model yet), so it waits "
                    f"(threshold {policy.threshold:g})")
        if ood > policy.threshold:
            return f"out-of-domain score {ood:.3g} is above the threshold {policy.threshold:g}"
        return None
    for text in policy.rules:
        rule = ApprovalRule.parse(text)
        if rule.matches(parameters, predicted or {}, sd or {}, ood):
            return f"approval rule {rule.text!r} matches"
    return None
