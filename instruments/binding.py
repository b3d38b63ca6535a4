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
from bluesky.utils import FailedPause, FailedStatus, Msg, RunEngineControlException, short_uid

Documents = list[tuple[str, dict[str, Any]]]
PlanFactory = Callable[[Any, dict[str, Any], dict[str, Any]], Generator[Msg, Any, Any]]


class MeasurementError(RuntimeError):
    """A run finished without the outcomes the campaign needs (failed, aborted, or incomplete)."""


class AcquisitionInterrupted(MeasurementError):
    """An interlock suspended the run while its acquisition was under way: the reading is not
    trusted (part of it was taken out of range), and the acquisition is not repeated (a second
    one could use material again). The trial yields no outcome; its point is not at fault."""


@dataclass(frozen=True)
class Observation:
    """The measured outcome of one run: values by outcome name, with the run uid they came from,
    and the units of each value where the device or the campaign file gives them."""

    values: dict[str, float]
    run_uid: str
    units: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RetryPolicy:
    """How a trial retries what cannot use material twice: the read of its results, attempted up
    to ``reads`` times (1: once), ``delay`` seconds apart. Never the moves or the acquisition."""

    reads: int = 3
    delay: float = 0.5


def _no_record(step: str, attempt: int, error: str) -> None:
    return None


@dataclass(frozen=True)
class PlanHooks:
    """What a runner lends the plan of one trial: ``suspensions()`` counts the suspensions its
    RunEngine has begun so far (an interlock tripped), and ``failed_attempt(step, attempt,
    error)`` records an attempt of a retried step that failed (the ledger keeps each)."""

    suspensions: Callable[[], int] = lambda: 0
    failed_attempt: Callable[[str, int, str], None] = _no_record


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
                    timeout: float | None = None, retry: RetryPolicy | None = None,
                    hooks: PlanHooks | None = None) -> Generator[Msg, Any, Any]:
    """One experiment: open a run (``md`` goes into its start document), move every parameter
    signal of ``device`` to its setpoint, trigger the device and read it once.

    ``timeout`` bounds the wait for each status (the moves, the trigger); a status that fails
    ends the run with the device's own message in the stop document's reason. A read that fails
    is attempted again as ``retry`` says (each failed attempt goes to ``hooks.failed_attempt``);
    the acquisition never is. Under a suspension (an interlock on the RunEngine) the moves are
    rewound and made again (the same setpoints: no material used); an acquisition that a
    suspension interrupted raises :class:`AcquisitionInterrupted` rather than be repeated.
    Yields bluesky messages; returns the run uid.
    """
    retry = retry or RetryPolicy()
    hooks = hooks or PlanHooks()

    @bpp.run_decorator(md=md)
    def inner():
        moves: list[Any] = []
        for name, value in parameters.items():
            moves += [getattr(device, signal_attr(name)), value]
        yield from bps.checkpoint()  # a suspension during the moves rewinds to here
        try:
            if moves:
                step = f"moving {', '.join(m.name for m in moves[::2])}"
                yield from bps.mv(*moves, timeout=timeout)
            # From the acquisition on, nothing is replayed: a second acquisition could use material.
            yield Msg("rewindable", None, False)
            step = f"trigger of {device.name}"
            group = short_uid("trigger")
            before = hooks.suspensions()
            yield from bps.trigger(device, group=group)
            yield from bps.wait(group=group, timeout=timeout)
            if hooks.suspensions() != before:
                raise AcquisitionInterrupted(
                    f"an interlock suspended the run during the acquisition of {device.name}; its reading "
                    "is not trusted and the acquisition is not repeated (it could use material again)")
        except FailedStatus as exc:
            raise MeasurementError(device_error_text(exc)) from exc
        except WaitForTimeoutError as exc:  # bluesky's text says neither what nor how long
            raise TimeoutError(f"{step} did not finish within {timeout:g} s") from exc
        yield from _read_with_retries(device, retry, hooks)

    yield Msg("rewindable", None, True)  # the last run left it off, after its acquisition
    return (yield from inner())


def _read_with_retries(device: Any, retry: RetryPolicy, hooks: PlanHooks) -> Generator[Msg, Any, None]:
    """Read ``device`` into one event of the primary stream; a read that raises is dropped and
    attempted again, ``retry.delay`` seconds later, up to ``retry.reads`` attempts in all."""
    step = f"read of {device.name}"
    for attempt in range(1, retry.reads + 1):
        yield from bps.create("primary")
        try:
            yield from bps.read(device)
        except (RunEngineControlException, FailedPause):  # an abort or a stop, not a failed read
            raise
        except Exception as exc:  # a timeout, a disconnected PV: reading again uses no material
            yield from bps.drop()
            text = device_error_text(exc)
            hooks.failed_attempt(step, attempt, text)
            if attempt == retry.reads:
                raise MeasurementError(f"the {step} failed {attempt} time(s) (retry.reads: {retry.reads}); "
                                       f"last: {text}") from exc
            yield from bps.sleep(retry.delay)
            continue
        yield from bps.save()
        return


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


def read_observation(documents: Documents, keys: dict[str, str],
                     units: dict[str, str] | None = None) -> Observation:
    """Take the observation out of one run's documents.

    ``keys`` maps outcome names to event data keys; ``units`` are the units the campaign file
    declares per outcome. Each value's units are the device's (its data key's ``units`` in the
    event descriptor, where a PV's EGU lands) or else the file's. Raises ``MeasurementError`` if
    the run did not stop successfully, lacks a finite value for an outcome, or reads an outcome
    in units other than the file declares (a reading in W is never recorded as mW).
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
    descriptor = next((d for n, d in documents if n == "descriptor" and d.get("uid") == events[-1].get("descriptor")),
                      {})
    values: dict[str, float] = {}
    found: dict[str, str] = {}
    for outcome, key in keys.items():
        if key not in data:
            raise MeasurementError(f"run {start['uid']} has no reading {key!r} for outcome {outcome!r}")
        value = float(data[key])
        if not math.isfinite(value):
            raise MeasurementError(f"run {start['uid']} read {outcome}={value}")
        values[outcome] = value
        read_in = ((descriptor.get("data_keys") or {}).get(key) or {}).get("units") or None
        given = (units or {}).get(outcome)
        if read_in and given and read_in != given:
            raise MeasurementError(
                f"run {start['uid']}: {outcome} ({key}) reads in {read_in!r} but the campaign file says {given!r}; "
                "the reading is refused rather than recorded in the wrong units: fix the file's units or the "
                "device's")
        if read_in or given:
            found[outcome] = str(read_in or given)
    return Observation(values=values, run_uid=start["uid"], units=found)


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
    #: outcome -> units the campaign file declares (a device that reads in others is refused)
    units: dict[str, str] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.result is None:
            keys, units = outcome_keys(self.device, self.outcomes), dict(self.units)
            self.result = lambda docs: read_observation(docs, keys, units)

    def plan_for(self, parameters: dict[str, Any], md: dict[str, Any], timeout: float | None = None,
                 hooks: PlanHooks | None = None) -> Generator[Msg, Any, Any]:
        """This instrument's plan for one trial; ``timeout`` (to bound its status waits), the
        instrument's ``retry`` policy and the runner's ``hooks`` go to a plan factory that takes
        them (as :func:`experiment_plan` does)."""
        try:
            takes = set(inspect.signature(self.plan).parameters)
        except (TypeError, ValueError):  # a callable without a signature: call it as documented
            takes = set()
        given = {"timeout": timeout, "retry": self.retry, "hooks": hooks}
        return self.plan(self.device, parameters, md, **{k: v for k, v in given.items() if k in takes})

    @property
    def data_keys(self) -> dict[str, str]:
        """Outcome name -> the event data key that carries it (put in each run's start document,
        so a reader elsewhere, such as the surrogate trainer, can find the outcomes); empty when
        the device has no signal named after an outcome (a custom reader knows better)."""
        try:
            return outcome_keys(self.device, self.outcomes)
        except AttributeError:
            return {}
