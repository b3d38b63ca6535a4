"""Interlocks: bluesky suspenders on an EPICS PV that pause an instrument's run while the PV is
out of its allowed range, and tell the runner when they trip and clear.

Built from bluesky's own ``SuspendFloor`` (below ``min``) and ``SuspendCeil`` (above ``max``), so
the allowed range is ``min <= value <= max`` at both ends; bluesky's ``SuspendWhenOutsideBand``
would refuse a value equal to a bound. Out of range, the RunEngine suspends at once (it stops
the motors, rewinds to the plan's last checkpoint and waits); back in range, it goes on
``resume_after`` seconds later. Who records it is the runner's business: an interlock only calls
``report(interlock, what, value)`` with ``what`` ``"tripped"`` or ``"cleared"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bluesky.suspenders import SuspendCeil, SuspendFloor

Report = Callable[["Interlock", str, float], None]


class _Reporting:
    """Mixed into a bluesky suspender: after each value, say whether it tripped or cleared."""

    interlock: Interlock

    def __call__(self, value: Any, **kwargs: Any) -> None:
        was = self.tripped  # type: ignore[attr-defined]
        super().__call__(value, **kwargs)  # type: ignore[misc]
        if self.tripped != was:  # type: ignore[attr-defined]
            self.interlock._changed(self.tripped, value)  # type: ignore[attr-defined]


class _Floor(_Reporting, SuspendFloor):
    pass


class _Ceil(_Reporting, SuspendCeil):
    pass


class Interlock:
    """One PV and its allowed range, as one or two bluesky suspenders (``suspenders``) to install
    on every RunEngine of the instrument. ``holding()``: whether a run would be held now (out of
    range, or back in range for less than ``resume_after``). ``max_wait``: the seconds one trial
    may be held before it is given up."""

    def __init__(self, signal: Any, pv: str, low: float | None, high: float | None, *,
                 resume_after: float = 0.0, max_wait: float = 3600.0, report: Report | None = None) -> None:
        assert low is not None or high is not None
        self.signal, self.pv, self.low, self.high = signal, pv, low, high
        self.resume_after, self.max_wait = resume_after, max_wait
        self.report = report
        self.tripped_since: float | None = None  # monotonic
        self.cleared_at: float | None = None
        self.value: float | None = None
        words = f"allowed {self.allowed}"
        self.suspenders: list[Any] = []
        if low is not None:
            self.suspenders.append(_Floor(signal, low, sleep=resume_after, tripped_message=words))
        if high is not None:
            self.suspenders.append(_Ceil(signal, high, sleep=resume_after, tripped_message=words))
        for s in self.suspenders:
            s.interlock = self

    @property
    def allowed(self) -> str:
        """The allowed range, as a person writes it."""
        if self.low is None:
            return f"{self.pv} <= {self.high:g}"
        if self.high is None:
            return f"{self.pv} >= {self.low:g}"
        return f"{self.low:g} <= {self.pv} <= {self.high:g}"

    def tripped(self) -> bool:
        return any(s.tripped for s in self.suspenders)

    def holding(self, now: float | None = None) -> bool:
        """Out of range, or back for less than ``resume_after`` (the RunEngine still waits)."""
        now = time.monotonic() if now is None else now
        if self.tripped():
            return True
        return self.cleared_at is not None and now - self.cleared_at < self.resume_after

    def _changed(self, tripped: bool, value: Any) -> None:
        now = time.monotonic()
        try:
            self.value = float(value)
        except (TypeError, ValueError):
            self.value = None
        if tripped == (self.tripped_since is not None):
            return  # the other suspender of this PV: one trip per excursion
        if tripped and self.tripped():
            self.tripped_since, self.cleared_at = now, None
        elif not tripped and not self.tripped():
            self.tripped_since, self.cleared_at = None, now
        else:
            return
        if self.report is not None:
            self.report(self, "tripped" if tripped else "cleared", self.value)  # type: ignore[arg-type]

    def install(self, RE: Any) -> None:
        for s in self.suspenders:
            RE.install_suspender(s)

    def remove(self, RE: Any) -> None:
        for s in self.suspenders:
            RE.remove_suspender(s)


def epics_interlock(pv: str, low: float | None, high: float | None, *, resume_after: float = 0.0,
                    max_wait: float = 3600.0, connection_timeout: float = 5.0,
                    report: Report | None = None) -> Interlock:
    """An :class:`Interlock` on the EPICS PV ``pv`` (an ``EpicsSignalRO`` monitoring it), connected
    within ``connection_timeout`` seconds or refused with a message naming the PV."""
    from instruments.epics_env import default_to_loopback

    default_to_loopback()  # before pyepics reads them; a user's own settings win
    from ophyd import EpicsSignalRO

    signal = EpicsSignalRO(pv, name=f"interlock_{pv}".replace(":", "_"), auto_monitor=True)
    try:
        signal.wait_for_connection(timeout=connection_timeout)
    except TimeoutError as exc:
        raise ConnectionError(f"the interlock PV {pv!r} did not connect within {connection_timeout:g} s; check "
                              "its name in 'suspend_when' and that its IOC runs") from exc
    return Interlock(signal, pv, low, high, resume_after=resume_after, max_wait=max_wait, report=report)
