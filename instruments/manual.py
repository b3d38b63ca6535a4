"""A person as the instrument: an ophyd device whose measurement is a result someone tells.

The campaign runs the same bluesky plan on it as on any instrument: the
parameters are set on its signals (what to measure), the trigger waits until
the person's result arrives (``labpilot tell``, the console), and the reading
is an ordinary event document. So a hand-measured result is journaled,
streamed, learned from by the surrogate trainer and recovered after a crash
exactly as a machine's is.
"""

from __future__ import annotations

import threading
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, DeviceStatus, Signal

from instruments.binding import signal_attr

#: seconds a person has for one measurement unless the instrument's ``timeout`` says otherwise
MANUAL_TIMEOUT = 30 * 24 * 3600.0


class ManualMeasurementFailed(RuntimeError):
    """The person measuring said the experiment failed (their words are the message)."""


class ManualInstrumentBase(Device):
    """Base of the generated device classes; see :func:`make_manual_device`."""

    outcome_names: list[str]

    def _setup(self, outcomes: list[str]) -> None:
        self.outcome_names = list(outcomes)
        self._lock = threading.Lock()
        self._status: DeviceStatus | None = None
        #: a result told before the run reached its trigger (a resumed campaign re-attaching the trial)
        self._early: tuple[dict[str, float] | None, str | None] | None = None

    def trigger(self) -> DeviceStatus:
        """Wait for the person's result: the status finishes when :meth:`tell` gives it."""
        with self._lock:
            self._status = DeviceStatus(self)
            for o in self.outcome_names:
                getattr(self, signal_attr(o)).put(float("nan"))
            status, early, self._early = self._status, self._early, None
        if early is not None:
            self.tell(*early)
        return status

    def expect(self) -> None:
        """A new trial is about to run here: forget any result not taken."""
        with self._lock:
            self._early = None

    @property
    def waiting(self) -> bool:
        """A measurement has been asked for and not yet told."""
        with self._lock:
            return self._status is not None and not self._status.done

    def tell(self, values: dict[str, float] | None = None, failed: str | None = None) -> str | None:
        """Give the result of the measurement asked for (``values`` by outcome name) or say it
        ``failed`` and why; returns why it cannot be taken, or ``None``."""
        with self._lock:
            status = self._status
            if status is None or status.done:
                # the run has not reached its trigger yet: the result waits for it
                missing = [o for o in self.outcome_names if failed is None and o not in (values or {})]
                if missing:
                    return f"{self.name} needs {missing}"
                self._early = (values, failed)
                return None
            if failed is not None:
                status.set_exception(ManualMeasurementFailed(f"the person measuring said it failed: {failed}"))
                return None
            missing = [o for o in self.outcome_names if o not in (values or {})]
            if missing:
                return f"{self.name} needs {missing}"
            for o in self.outcome_names:
                getattr(self, signal_attr(o)).put(float(values[o]))  # type: ignore[index]
            status.set_finished()
            return None


def make_manual_device(name: str, parameters: list[Any], outcomes: list[str]) -> ManualInstrumentBase:
    """An ophyd device for a person: one settable ``Signal`` per parameter (what to measure), one
    ``Signal`` per outcome (what they told)."""
    attrs: dict[str, Any] = {signal_attr(p.name): Cpt(Signal, value=None, kind="normal") for p in parameters}
    attrs.update({signal_attr(o): Cpt(Signal, value=float("nan"), kind="hinted") for o in outcomes})
    cls = type("ManualInstrument", (ManualInstrumentBase,), attrs)
    device = cls(name=name)
    device._setup(outcomes)
    return device
