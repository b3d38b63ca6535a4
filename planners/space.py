"""The search space: parameters, linear constraints, objectives and outcome constraints.

These are the planners' vocabulary (DESIGN.md): plain pydantic models a user
writes in YAML, plus the encoding that maps a point to the unit cube that the
models work in.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # torch is imported where tensors are made: checking a campaign file needs none
    import torch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatParameter(_Strict):
    """A continuous parameter in ``[lower, upper]``, optionally searched on a log scale."""

    name: str
    type: Literal["float"] = "float"
    lower: float
    upper: float
    log_scale: bool = False
    units: str | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> FloatParameter:
        if not self.lower < self.upper:
            raise ValueError(
                f"bounds reversed or empty: lower={self.lower} must be below upper={self.upper}; "
                "swap them or widen the range"
            )
        if self.log_scale and self.lower <= 0:
            raise ValueError(
                f"log_scale needs lower > 0 (got {self.lower}); raise lower or set log_scale: false"
            )
        return self


class IntParameter(_Strict):
    """An integer parameter in ``[lower, upper]`` (both included)."""

    name: str
    type: Literal["int"] = "int"
    lower: int
    upper: int
    units: str | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> IntParameter:
        if not self.lower < self.upper:
            raise ValueError(
                f"bounds reversed or empty: lower={self.lower} must be below upper={self.upper}"
            )
        return self


class CategoricalParameter(_Strict):
    """A parameter that takes one of a list of choices (unordered)."""

    name: str
    type: Literal["categorical"] = "categorical"
    choices: list[str | int | float] = Field(min_length=2)

    @model_validator(mode="after")
    def _check_choices(self) -> CategoricalParameter:
        if len(set(map(str, self.choices))) != len(self.choices):
            raise ValueError("choices repeat; list each choice once")
        return self


Parameter = Annotated[
    FloatParameter | IntParameter | CategoricalParameter, Field(discriminator="type")
]

_TERM = re.compile(r"\s*([+-])?\s*(?:(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*\*?\s*)?([A-Za-z_]\w*)\s*")
_LINEAR = re.compile(r"^(.*?)(<=|>=|==)\s*([+-]?\s*\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*$")


class LinearConstraint(_Strict):
    """``sum(coefficients[p] * p) <op> rhs`` over float parameters.

    Written in YAML as a string (``"x1 + 2*x2 <= 10"``), or as a group of
    fractions that must add up to a total (``{fractions: [a, b, c], total: 1}``).
    """

    coefficients: dict[str, float]
    op: Literal["<=", ">=", "=="]
    rhs: float

    @classmethod
    def parse(cls, text: str) -> LinearConstraint:
        match = _LINEAR.match(text.strip())
        if not match:
            raise ValueError(
                f"cannot read constraint {text!r}; write it as 'x1 + 2*x2 <= 10' "
                "(operators <=, >=, ==; a number on the right)"
            )
        lhs, op, rhs = match.groups()
        coefficients: dict[str, float] = {}
        pos = 0
        lhs = lhs.strip()
        while pos < len(lhs):
            term = _TERM.match(lhs, pos)
            if not term or term.end() == pos:
                raise ValueError(
                    f"cannot read {lhs[pos:]!r} in constraint {text!r}; "
                    "each term is a number times a parameter name, e.g. '2*x1'"
                )
            sign, number, name = term.groups()
            value = float(number) if number else 1.0
            coefficients[name] = coefficients.get(name, 0.0) + (-value if sign == "-" else value)
            pos = term.end()
        if not coefficients:
            raise ValueError(f"constraint {text!r} names no parameter")
        return cls(coefficients=coefficients, op=op, rhs=float(rhs.replace(" ", "")))

    def __str__(self) -> str:
        lhs = " + ".join(f"{c:g}*{n}" for n, c in self.coefficients.items())
        return f"{lhs} {self.op} {self.rhs:g}"

    def satisfied(self, point: dict[str, Any], tol: float = 1e-6) -> bool:
        value = sum(c * float(point[n]) for n, c in self.coefficients.items())
        if self.op == "<=":
            return value <= self.rhs + tol
        if self.op == ">=":
            return value >= self.rhs - tol
        return abs(value - self.rhs) <= tol


class Objective(_Strict):
    """What the campaign wants of one measured outcome."""

    name: str
    goal: Literal["maximize", "minimize", "target"] = "maximize"
    target: float | None = None
    units: str | None = None

    @model_validator(mode="after")
    def _check_target(self) -> Objective:
        if self.goal == "target" and self.target is None:
            raise ValueError("goal 'target' needs a 'target: <value>'")
        if self.goal != "target" and self.target is not None:
            raise ValueError(f"'target' is only read when goal is 'target' (goal is {self.goal!r})")
        return self

    def utility(self, value: torch.Tensor | float) -> Any:
        """Map a measured value to a number where larger is better."""
        if self.goal == "maximize":
            return value
        if self.goal == "minimize":
            return -value
        return -abs(value - self.target)  # type: ignore[operator]


_OUTCOME = re.compile(r"^\s*([A-Za-z_]\w*)\s*(<=|>=)\s*([+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*$")


class OutcomeConstraint(_Strict):
    """A bound a measured outcome must respect, written ``"purity >= 0.9"``."""

    name: str
    op: Literal["<=", ">="]
    bound: float

    @classmethod
    def parse(cls, text: str) -> OutcomeConstraint:
        match = _OUTCOME.match(text)
        if not match:
            raise ValueError(
                f"cannot read outcome constraint {text!r}; write it as 'purity >= 0.9'"
            )
        name, op, bound = match.groups()
        return cls(name=name, op=op, bound=float(bound))

    def satisfied(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def slack(self, value: torch.Tensor) -> torch.Tensor:
        """Negative where satisfied (BoTorch's convention for constraint callables)."""
        return self.bound - value if self.op == ">=" else value - self.bound


class SearchSpace(_Strict):
    """Parameters and the linear constraints among them, with a unit-cube encoding.

    The encoding (``d`` encoded dimensions): each float becomes one column in
    ``[0, 1]`` (after a log for log-scaled ones); each int one column over
    ``[lower - 0.5, upper + 0.5]`` rounded on decoding; each categorical one
    one-hot column per choice.
    """

    parameters: list[Parameter]
    constraints: list[LinearConstraint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"parameter names repeat: {dup}; give each parameter its own name")
        by_name = {p.name: p for p in self.parameters}
        for c in self.constraints:
            for n in c.coefficients:
                if n not in by_name:
                    raise ValueError(
                        f"constraint '{c}' names unknown parameter {n!r}; known: {sorted(by_name)}"
                    )
                p = by_name[n]
                if not isinstance(p, FloatParameter) or p.log_scale:
                    raise ValueError(
                        f"constraint '{c}' uses {n!r}, which is not a linear-scale float; "
                        "linear constraints take float parameters without log_scale"
                    )
        return self

    # ---- structure -------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parameters]

    def columns(self) -> list[tuple[Parameter, slice]]:
        """Each parameter with the slice of encoded columns it occupies."""
        out, i = [], 0
        for p in self.parameters:
            width = len(p.choices) if isinstance(p, CategoricalParameter) else 1
            out.append((p, slice(i, i + width)))
            i += width
        return out

    @property
    def dim(self) -> int:
        return self.columns()[-1][1].stop

    @property
    def categorical_combinations(self) -> list[dict[int, float]]:
        """Every assignment of the one-hot columns, as ``{column: value}`` (fixed features)."""
        groups = []
        for p, sl in self.columns():
            if isinstance(p, CategoricalParameter):
                cols = list(range(sl.start, sl.stop))
                groups.append([{c: float(c == chosen) for c in cols} for chosen in cols])
        combos = []
        for parts in itertools.product(*groups):
            merged: dict[int, float] = {}
            for part in parts:
                merged.update(part)
            combos.append(merged)
        return combos

    # ---- encoding ----------------------------------------------------------
    def encode(self, points: list[dict[str, Any]]) -> torch.Tensor:
        """Parameters -> ``n x d`` tensor in the unit cube (double)."""
        import torch

        X = torch.zeros(len(points), self.dim, dtype=torch.double)
        for i, point in enumerate(points):
            for p, sl in self.columns():
                v = point[p.name]
                if isinstance(p, FloatParameter):
                    if p.log_scale:
                        z = (math.log(v) - math.log(p.lower)) / (math.log(p.upper) - math.log(p.lower))
                    else:
                        z = (float(v) - p.lower) / (p.upper - p.lower)
                    X[i, sl.start] = z
                elif isinstance(p, IntParameter):
                    X[i, sl.start] = (int(v) - p.lower + 0.5) / (p.upper - p.lower + 1)
                else:
                    X[i, sl.start + [str(c) for c in p.choices].index(str(v))] = 1.0
        return X

    def decode(self, X: torch.Tensor) -> list[dict[str, Any]]:
        """``n x d`` unit-cube tensor -> legal parameter values (rounded, snapped)."""
        import torch

        out = []
        for row in X.detach().cpu().double():
            point: dict[str, Any] = {}
            for p, sl in self.columns():
                if isinstance(p, FloatParameter):
                    z = float(row[sl.start].clamp(0, 1))
                    if p.log_scale:
                        v = math.exp(math.log(p.lower) + z * (math.log(p.upper) - math.log(p.lower)))
                    else:
                        v = p.lower + z * (p.upper - p.lower)
                    point[p.name] = min(max(v, p.lower), p.upper)
                elif isinstance(p, IntParameter):
                    z = float(row[sl.start].clamp(0, 1))
                    v = math.floor(p.lower - 0.5 + z * (p.upper - p.lower + 1) + 0.5)
                    point[p.name] = int(min(max(v, p.lower), p.upper))
                else:
                    point[p.name] = p.choices[int(torch.argmax(row[sl]))]
            out.append(point)
        return out

    def linear_constraints_encoded(
        self,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, float]], list[tuple[torch.Tensor, torch.Tensor, float]]]:
        """Constraints in BoTorch's form over encoded columns: (inequalities ``>=``, equalities).

        Each is ``(indices, coefficients, rhs)`` meaning ``sum(coef * X[..., idx]) >= rhs``
        (or ``== rhs``), as ``optimize_acqf`` takes them.
        """
        import torch

        cols = {p.name: (p, sl) for p, sl in self.columns()}
        ineq, eq = [], []
        for c in self.constraints:
            idx, coef, rhs = [], [], c.rhs
            for n, a in c.coefficients.items():
                p, sl = cols[n]
                assert isinstance(p, FloatParameter)
                # x = lower + (upper - lower) * z
                idx.append(sl.start)
                coef.append(a * (p.upper - p.lower))
                rhs -= a * p.lower
            sign = -1.0 if c.op == "<=" else 1.0
            entry = (
                torch.tensor(idx, dtype=torch.long),
                torch.tensor(coef, dtype=torch.double) * (sign if c.op != "==" else 1.0),
                float(rhs * (sign if c.op != "==" else 1.0)),
            )
            (eq if c.op == "==" else ineq).append(entry)
        return ineq, eq

    def is_feasible(self, point: dict[str, Any], tol: float = 1e-6) -> bool:
        return all(c.satisfied(point, tol) for c in self.constraints)

    def validate_point(self, point: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming what is wrong with a point."""
        for p in self.parameters:
            if p.name not in point:
                raise ValueError(f"point lacks parameter {p.name!r}")
            v = point[p.name]
            if isinstance(p, CategoricalParameter):
                if str(v) not in [str(c) for c in p.choices]:
                    raise ValueError(f"{p.name}={v!r} is not one of {p.choices}")
            elif not (p.lower - 1e-9 <= float(v) <= p.upper + 1e-9):
                raise ValueError(f"{p.name}={v} is outside [{p.lower}, {p.upper}]")
        for c in self.constraints:
            if not c.satisfied(point):
                raise ValueError(f"point breaks constraint '{c}'")
