"""The instrument binding: an ophyd device, a plan factory and a reader of documents."""

from __future__ import annotations

import inspect
import keyword
import math
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.run_engine import WaitForTimeoutError
from bluesky.utils import FailedStatus, Msg, short_uid

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


def experiment_plan(device: Any, parameters: dict[str, Any], md: dict[str, Any], *,
                    timeout: float | None = None) -> Generator[Msg, Any, Any]:
    """One experiment: open a run (``md`` goes into its start document), move every parameter
    signal of ``device`` to its setpoint, trigger the device and read it once.

    ``timeout`` bounds the wait for each status (the moves, the trigger); a status that fails
    ends the run with the device's own message in the stop document's reason.
    Yields bluesky messages; returns the run uid.
    """

    @bpp.run_decorator(md=md)
    def inner():
        moves: list[Any] = []
        for name, value in parameters.items():
            moves += [getattr(device, signal_attr(name)), value]
        try:
            if moves:
                step = f"moving {', '.join(m.name for m in moves[::2])}"
                yield from bps.mv(*moves, timeout=timeout)
            step = f"trigger of {device.name}"
            group = short_uid("trigger")
            yield from bps.trigger(device, group=group)
            yield from bps.wait(group=group, timeout=timeout)
        except FailedStatus as exc:
            raise MeasurementError(device_error_text(exc)) from exc
        except WaitForTimeoutError as exc:  # bluesky's text says neither what nor how long
            raise TimeoutError(f"{step} did not finish within {timeout:g} s") from exc
        yield from bps.create("primary")
        yield from bps.read(device)
        yield from bps.save()

    return (yield from inner())


def device_error_text(error: BaseException) -> str:
    """What went wrong, in the device's own words: bluesky's ``FailedStatus`` carries only the
    status object; the device's exception is its cause (``status.exception()``)."""
    while isinstance(error, FailedStatus):
        status = error.args[0] if error.args else None
        cause = error.__cause__
        if cause is None and status is not None and hasattr(status, "exception"):
            try:
                cause = status.exception(timeout=0)
            except Exception:  # an ophyd status that is not done yet: nothing more to say
                cause = None
        device = getattr(getattr(status, "device", None), "name", None) or getattr(status, "obj", None)
        where = f"{device}: " if isinstance(device, str) else ""
        if cause is None:
            return f"{where}status failed without saying why"
        if isinstance(cause, FailedStatus):
            error = cause
            continue
        if where and str(device) in str(cause):  # the device already named itself
            where = ""
        return f"{where}{type(cause).__name__}: {cause}" if str(cause) else f"{where}{type(cause).__name__}"
    if isinstance(error, MeasurementError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


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

    def plan_for(self, parameters: dict[str, Any], md: dict[str, Any],
                 timeout: float | None = None) -> Generator[Msg, Any, Any]:
        """This instrument's plan for one trial; ``timeout`` goes to a plan factory that takes one
        (as :func:`experiment_plan` does), to bound its status waits."""
        try:
            takes_timeout = "timeout" in inspect.signature(self.plan).parameters
        except (TypeError, ValueError):  # a callable without a signature: call it as documented
            takes_timeout = False
        if takes_timeout:
            return self.plan(self.device, parameters, md, timeout=timeout)  # type: ignore[call-arg]
        return self.plan(self.device, parameters, md)

    @property
    def data_keys(self) -> dict[str, str]:
        """Outcome name -> the event data key that carries it (put in each run's start document,
        so a reader elsewhere, such as the surrogate trainer, can find the outcomes); empty when
        the device has no signal named after an outcome (a custom reader knows better)."""
        try:
            return outcome_keys(self.device, self.outcomes)
        except AttributeError:
            return {}
