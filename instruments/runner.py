"""Runs one trial's plan on one instrument's RunEngine, with a watchdog and a live activity line."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted

from instruments.binding import Documents, Instrument, MeasurementError, Observation

_ACTIVITY = {"set": "moving", "trigger": "measuring", "read": "reading", "open_run": "starting run",
             "close_run": "closing run", "wait": "waiting"}


class InstrumentTimeout(MeasurementError):
    """The instrument did not finish a trial in time; the run was aborted."""


class InstrumentRunner:
    """One RunEngine for one instrument (DESIGN.md); runs one trial at a time.

    ``on_document(name, doc)`` sees every document (to stream them);
    ``activity`` says what the instrument is doing, for the console.
    """

    def __init__(self, instrument: Instrument,
                 on_document: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.instrument = instrument
        # No context managers: the RunEngine runs in a worker thread, where SIGINT handling
        # cannot be installed; the flow owns interruption.
        self.RE = RunEngine({}, context_managers=[])
        self.RE.msg_hook = self._on_msg
        self._docs: Documents = []
        self._lock = threading.Lock()
        self.activity = "idle"
        self.RE.subscribe(self._collect)
        if on_document is not None:
            self.RE.subscribe(on_document)

    def _collect(self, name: str, doc: dict[str, Any]) -> None:
        self._docs.append((name, doc))

    def _on_msg(self, msg: Any) -> None:
        what = _ACTIVITY.get(msg.command)
        if what:
            target = getattr(msg.obj, "name", "")
            self.activity = f"{what} {target}".strip()

    def run(self, parameters: dict[str, Any], md: dict[str, Any], timeout: float | None = None) -> tuple[Observation, Documents]:
        """Run one experiment; return its observation and documents.

        Raises ``InstrumentTimeout`` after ``timeout`` seconds (the run is aborted
        and its stop document says so) and ``MeasurementError`` when the run
        fails. Never leaves the RunEngine busy.
        """
        limit = timeout if timeout is not None else self.instrument.timeout
        with self._lock:
            self._docs = []
            timed_out = threading.Event()

            def watchdog() -> None:
                if self.RE.state != "idle":  # a run that just finished is not a timeout
                    timed_out.set()
                    self.RE.abort(reason=f"timed out after {limit:g} s")

            timer = threading.Timer(limit, watchdog)
            timer.daemon = True
            timer.start()
            error: BaseException | None = None
            try:
                self.RE(self.instrument.plan(self.instrument.device, parameters, md))
            except RunEngineInterrupted as exc:
                error = exc
            except Exception as exc:  # a failed status, a device error: the run's stop doc says which
                error = exc
            finally:
                timer.cancel()
                if self.RE.state != "idle":
                    self.RE.abort(reason="cleanup after error")
                self.activity = "idle"
            docs = list(self._docs)
            if timed_out.is_set():
                raise InstrumentTimeout(
                    f"instrument {self.instrument.name!r} did not finish within {limit:g} s; "
                    "the run was aborted (raise the instrument's 'timeout' if it is just slow)"
                )
            try:
                observation = self.instrument.result(docs)  # type: ignore[misc]
            except MeasurementError as exc:
                if error is not None:
                    raise MeasurementError(f"{exc} ({type(error).__name__}: {error})") from error
                raise
            return observation, docs
