"""Runs one trial's plan on one instrument's RunEngine, with a watchdog and a live activity line."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted

from instruments.binding import (
    AcquisitionInterrupted,
    Documents,
    Instrument,
    MeasurementError,
    Observation,
    PlanHooks,
    device_error_text,
)

_ACTIVITY = {"set": "moving", "trigger": "measuring", "read": "reading", "open_run": "starting run",
             "close_run": "closing run", "wait": "waiting"}

# How long, after the timeout, a run may take to wind down once aborted; a run that has not
# ended by then is stuck in a device call and is abandoned.
ABORT_GRACE_S = 1.0


# How often the watchdog looks at the interlocks while a run is under way.
WATCH_S = 0.05


class InstrumentTimeout(MeasurementError):
    """The instrument did not finish a trial in time; the run was aborted (or, when a device
    call never returned, abandoned)."""


class InterlockHeld(MeasurementError):
    """An interlock held the trial's run longer than its ``max_wait``; the run was aborted. The
    trial is abandoned, not failed: its point is not at fault."""


#: what a runner raises when an interlock kept a trial from being measured (abandon, not fail)
INTERLOCK_ERRORS = (InterlockHeld, AcquisitionInterrupted)


class InstrumentRunner:
    """One RunEngine for one instrument (DESIGN.md); runs one trial at a time.

    ``on_document(name, doc)`` sees every document (to stream them);
    ``activity`` says what the instrument is doing, for the console.
    ``abandoned`` lists, one line each, the runs given up on because a device call
    blocked the RunEngine past the timeout (their threads are left to finish or hang).

    ``interlocks`` (:class:`instruments.interlock.Interlock`) are installed as suspenders on
    every RunEngine this runner makes. While one holds the run, the watchdog's clock stops (a
    trial is not timed out because the temperature left its range), up to the interlock's
    ``max_wait``. ``on_event(kind, body)`` is told, with the trial's id and the time, of each
    interlock that trips or clears (``"suspension"``, body ``what``: tripped/cleared) and of each
    failed attempt of a retried read (``"retry"``).
    """

    def __init__(self, instrument: Instrument,
                 on_document: Callable[[str, dict[str, Any]], None] | None = None,
                 interlocks: list[Any] = (),  # type: ignore[assignment]
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.instrument = instrument
        self._on_document = on_document
        self._on_event = on_event
        self._docs: Documents = []
        self._lock = threading.Lock()
        self._step: tuple[str, str, float] | None = None  # (command, object name, since)
        self._trial_id: Any = None
        self._suspensions = 0  # suspensions begun on this runner's RunEngines
        self.activity = "idle"
        self.abandoned: list[str] = []
        self._threads: list[threading.Thread] = []  # aborts asked for, and the run thread
        self.interlocks = list(interlocks)
        for il in self.interlocks:
            il.report = self._interlock_changed
        self.RE = self._fresh_run_engine()

    def _emit(self, kind: str, body: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(kind, {"instrument": self.instrument.name, "trial_id": self._trial_id,
                                  "at": time.time(), **body})

    def _interlock_changed(self, interlock: Any, what: str, value: float | None) -> None:
        self._emit("suspension", {"what": what, "pv": interlock.pv, "allowed": interlock.allowed,
                                  "value": value, "resume_after": interlock.resume_after})
        if what == "tripped":
            self.activity = f"suspended: {interlock.pv} = {value:g}, allowed {interlock.allowed}" \
                if value is not None else f"suspended: {interlock.pv} out of range"

    def _failed_attempt(self, step: str, attempt: int, error: str) -> None:
        self._emit("retry", {"step": step, "attempt": attempt, "of": self.instrument.retry.reads,
                             "error": error})

    def _fresh_run_engine(self, previous: RunEngine | None = None) -> RunEngine:
        """A RunEngine with its own event loop thread, wired to this runner, its interlocks
        moved onto it from ``previous``."""
        # No context managers: the RunEngine runs in a worker thread, where SIGINT handling
        # cannot be installed; the flow owns interruption.
        RE = RunEngine({}, context_managers=[])
        for il in self.interlocks:
            if previous is not None:
                il.remove(previous)
            il.install(RE)

        def collect(name: str, doc: dict[str, Any]) -> None:
            if self.RE is RE:  # an abandoned run's late documents belong to no trial of ours
                self._docs.append((name, doc))

        def on_msg(msg: Any) -> None:
            if self.RE is not RE:
                return
            if msg.command == "_start_suspender":
                self._suspensions += 1
            self._step = (msg.command, getattr(msg.obj, "name", "") or "", time.monotonic())
            what = _ACTIVITY.get(msg.command)
            if what:
                self.activity = f"{what} {self._step[1]}".strip()

        RE.msg_hook = on_msg
        RE.subscribe(collect)
        if self._on_document is not None:
            # Late documents of an abandoned run (its stop, once the device call returns) still
            # go to the stream: they are the truth about that run.
            RE.subscribe(self._on_document)
        return RE

    def close(self, settle: float = 0.0) -> None:
        """Take the interlocks off the RunEngine and stop telling ``on_event`` anything; with
        ``settle``, first wait up to that many seconds for aborts asked for and the run they end
        (a process that exits while a RunEngine still winds down prints its threads' errors)."""
        deadline = time.monotonic() + settle
        for thread in [*self._threads]:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._on_event = None
        for il in self.interlocks:
            il.remove(self.RE)

    def abort(self, reason: str) -> None:
        """Ask the current run to abort, without waiting: ``RunEngine.abort`` blocks until the
        RunEngine's loop takes the request, which never happens while a device call blocks it."""
        RE = self.RE
        if RE.state == "idle":
            return

        def request() -> None:
            try:
                RE.abort(reason=reason)
            except Exception:  # the run ended meanwhile: nothing to abort
                pass

        thread = threading.Thread(target=request, name=f"{self.instrument.name}-abort", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def run(self, parameters: dict[str, Any], md: dict[str, Any], timeout: float | None = None) -> tuple[Observation, Documents]:
        """Run one experiment; return its observation and documents.

        Raises ``InstrumentTimeout`` within ``timeout`` (+ ``ABORT_GRACE_S``) seconds: the run
        is aborted and its stop document says so; if a device call blocks the RunEngine and the
        run cannot even be aborted, it is abandoned and the next trial gets a fresh RunEngine.
        Raises ``MeasurementError`` when the run fails, with the device's own message. Time an
        interlock holds the run does not count against ``timeout``; held past its ``max_wait``,
        or suspended during the acquisition, the run raises one of ``INTERLOCK_ERRORS``. Never
        leaves the runner busy.
        """
        limit = timeout if timeout is not None else self.instrument.timeout
        with self._lock:
            self._docs = []
            self._step = None
            self._trial_id = md.get("trial_id")
            try:
                return self._run(parameters, md, limit)
            finally:
                self._trial_id = None

    def _run(self, parameters: dict[str, Any], md: dict[str, Any], limit: float) -> tuple[Observation, Documents]:
        RE = self.RE
        outcome: dict[str, BaseException] = {}
        # The plan's own status timeouts are a backstop for when it runs without this watchdog
        # (another RunEngine); here the watchdog's abort comes first.
        hooks = PlanHooks(suspensions=lambda: self._suspensions, failed_attempt=self._failed_attempt)
        plan = self.instrument.plan_for(parameters, md, timeout=limit + ABORT_GRACE_S / 2, hooks=hooks)

        def execute() -> None:
            try:
                RE(plan)
            except BaseException as exc:  # interrupted, a failed status, a device error
                outcome["error"] = exc

        # The RunEngine is driven from a thread of its own so that this one can keep time:
        # RE(...) does not return while a device call blocks the RunEngine's loop.
        worker = threading.Thread(target=execute, name=f"{self.instrument.name}-run", daemon=True)
        t0 = time.monotonic()
        worker.start()
        held_too_long = self._watch(worker, limit, t0)
        timed_out = worker.is_alive()
        stuck = ""
        if timed_out:
            self.abort(held_too_long or f"timed out after {limit:g} s")
            worker.join(ABORT_GRACE_S)
            if worker.is_alive():
                stuck = self._abandon(RE, time.monotonic() - t0)
        self.activity = "idle"
        error = outcome.get("error")
        if held_too_long:
            raise InterlockHeld(f"instrument {self.instrument.name!r}: {held_too_long}; the run was aborted "
                                "and the trial abandoned (raise the interlock's 'max_wait' to wait longer)")
        if not timed_out and RE.state != "idle":  # paranoia: never leave the RunEngine busy
            self.abort("cleanup after error")
        docs = list(self._docs)
        if timed_out or _is_timeout(error):
            detail = f": {stuck}" if stuck else (
                f" ({device_error_text(error)})" if _is_timeout(error) else "")
            then = "the next trial gets a fresh RunEngine" if stuck else "the run was aborted"
            raise InstrumentTimeout(
                f"instrument {self.instrument.name!r} did not finish within {limit:g} s{detail}; "
                f"{then} (raise the instrument's 'timeout' if it is just slow)"
            ) from error
        try:
            observation = self.instrument.result(docs)  # type: ignore[misc]
        except MeasurementError:
            if isinstance(error, INTERLOCK_ERRORS):
                raise error from None  # its own words: the run ended because of it
            if error is not None and not isinstance(error, RunEngineInterrupted):
                start = next((d for n, d in docs if n == "start"), None)
                run = f"run {start['uid']} " if start else ""
                raise MeasurementError(f"{run}failed: {device_error_text(error)}") from error
            raise
        return observation, docs

    def _watch(self, worker: threading.Thread, limit: float, t0: float) -> str:
        """Wait for ``worker`` (the run) to end, up to ``limit`` seconds of time not held by an
        interlock. Returns ``""``, or why the run must stop because an interlock held it longer
        than its ``max_wait`` (its clock: this trial's time held)."""
        if not self.interlocks:
            worker.join(limit)
            return ""
        held = 0.0
        while True:
            now = time.monotonic()
            remaining = limit - (now - t0 - held)
            if remaining <= 0:
                return ""
            worker.join(min(remaining, WATCH_S))
            if not worker.is_alive():
                return ""
            later = time.monotonic()
            holding = [il for il in self.interlocks if il.holding(later)]
            if holding:
                held += later - now
                worst = min(holding, key=lambda il: il.max_wait)
                if held > worst.max_wait:
                    value = f" (it reads {worst.value:g})" if worst.value is not None else ""
                    return (f"the interlock {worst.allowed} held the run for {held:.3g} s{value}, past its "
                            f"max_wait of {worst.max_wait:g} s")

    def _abandon(self, RE: RunEngine, elapsed: float) -> str:
        """Give up on ``RE``, whose loop is stuck in a device call; say which call."""
        command, obj, since = self._step or ("plan", self.instrument.name, time.monotonic() - elapsed)
        what = f"{command}() of {obj or self.instrument.name}"
        line = f"{what} blocked for {time.monotonic() - since:.2g} s and did not return; abandoned"
        self.abandoned.append(line)
        self.RE = self._fresh_run_engine(RE)
        return line


def _is_timeout(error: BaseException | None) -> bool:
    """Whether the run failed because a status or a wait timed out (the plan's own timeouts)."""
    while error is not None:
        if isinstance(error, TimeoutError):
            return True
        error = error.__cause__
    return False
