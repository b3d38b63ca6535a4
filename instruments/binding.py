"""The instrument binding: an ophyd device, a plan factory and a reader of documents."""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import Msg

Documents = list[tuple[str, dict[str, Any]]]
PlanFactory = Callable[[Any, dict[str, Any], dict[str, Any]], Generator[Msg, Any, Any]]


class MeasurementError(RuntimeError):
    """A run finished without the outcomes the campaign needs (failed, aborted, or incomplete)."""


@dataclass(frozen=True)
class Observation:
    """The measured outcome of one run: values by outcome name, with the run uid they came from."""

    values: dict[str, float]
    run_uid: str
    units: dict[str, str] = field(default_factory=dict)


def signal_attr(name: str) -> str:
    """The device attribute that holds the signal for parameter or outcome ``name``.

    Campaign names are free text a scientist chose (``yield``, ``pd-mol``); device
    attributes must be identifiers, and not keywords: ``yield`` -> ``yield_``.
    """
    attr = re.sub(r"\W", "_", name)
    if not attr or attr[0].isdigit():
        attr = f"p_{attr}"
    if keyword.iskeyword(attr) or attr.startswith("_"):
        attr = f"{attr}_"
    return attr


def experiment_plan(device: Any, parameters: dict[str, Any], md: dict[str, Any]) -> Generator[Msg, Any, Any]:
    """One experiment: open a run (``md`` goes into its start document), move every parameter
    signal of ``device`` to its setpoint, trigger the device and read it once.

    Yields bluesky messages; returns the run uid.
    """

    @bpp.run_decorator(md=md)
    def inner():
        moves: list[Any] = []
        for name, value in parameters.items():
            moves += [getattr(device, signal_attr(name)), value]
        if moves:
            yield from bps.mv(*moves)
        yield from bps.trigger_and_read([device])

    return (yield from inner())


def outcome_keys(device: Any, outcomes: list[str]) -> dict[str, str]:
    """Outcome name -> the data key its signal writes into event documents."""
    return {o: getattr(device, signal_attr(o)).name for o in outcomes}


def read_observation(documents: Documents, keys: dict[str, str]) -> Observation:
    """Take the observation out of one run's documents.

    ``keys`` maps outcome names to event data keys. Raises ``MeasurementError``
    if the run did not stop successfully or lacks a finite value for an outcome.
    """
    start = next((d for n, d in documents if n == "start"), None)
    stop = next((d for n, d in documents if n == "stop"), None)
    if start is None:
        raise MeasurementError("the run emitted no start document")
    if stop is None or stop.get("exit_status") != "success":
        status = stop.get("exit_status") if stop else "no stop document"
        reason = (stop or {}).get("reason") or ""
        raise MeasurementError(f"run {start['uid']} ended with {status}: {reason}".strip().rstrip(":"))
    events = [d for n, d in documents if n == "event"]
    if not events:
        raise MeasurementError(f"run {start['uid']} recorded no event")
    data = events[-1]["data"]
    values: dict[str, float] = {}
    for outcome, key in keys.items():
        if key not in data:
            raise MeasurementError(f"run {start['uid']} has no reading {key!r} for outcome {outcome!r}")
        value = float(data[key])
        if not math.isfinite(value):
            raise MeasurementError(f"run {start['uid']} read {outcome}={value}")
        values[outcome] = value
    return Observation(values=values, run_uid=start["uid"])


@dataclass
class Instrument:
    """A named binding (DESIGN.md): device, plan factory ``plan(device, parameters, md)``,
    reader ``result(documents) -> Observation``. One RunEngine runs it, one trial at a time."""

    name: str
    device: Any
    outcomes: list[str]
    plan: PlanFactory = experiment_plan
    result: Callable[[Documents], Observation] | None = None
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.result is None:
            keys = outcome_keys(self.device, self.outcomes)
            self.result = lambda docs: read_observation(docs, keys)

    @property
    def data_keys(self) -> dict[str, str]:
        """Outcome name -> the event data key that carries it (put in each run's start document,
        so a reader elsewhere, such as the surrogate trainer, can find the outcomes); empty when
        the device has no signal named after an outcome (a custom reader knows better)."""
        try:
            return outcome_keys(self.device, self.outcomes)
        except AttributeError:
            return {}
