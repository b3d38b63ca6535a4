"""A ``kind: epics`` instrument: an ophyd device built from the campaign file's ``epics:`` block.

Each parameter is an ophyd positioner on its PVs (``PVPositionerPC`` for put completion,
``PVPositionerIsClose`` for a readback within a tolerance, ``PVPositioner`` with a done PV);
the trigger writes an acquire PV (put completion, or a busy PV going 1 -> 0) and, with a
``counter``, waits for it to advance; each outcome is an ``EpicsSignalRO``. Every move, trigger
and read carries the block's ``timeout`` in its ophyd status, so a stuck IOC fails the trial
with a message naming what did not finish. The attributes are named by
:func:`instruments.binding.signal_attr`, so :func:`~instruments.binding.experiment_plan` drives
it as it drives any device.

Channel Access stays on this host unless the user says otherwise: the loopback settings are
put into the environment (where not set) before pyepics is imported.
"""

from __future__ import annotations

from instruments.epics_env import LOOPBACK_ENV, default_to_loopback  # noqa: F401 - re-exported

default_to_loopback()  # before pyepics reads them; a user's own settings win

from typing import Any  # noqa: E402

from ophyd import Component as Cpt  # noqa: E402
from ophyd import Device, EpicsSignal, EpicsSignalRO  # noqa: E402
from ophyd.pv_positioner import PVPositioner, PVPositionerIsClose, PVPositionerPC  # noqa: E402
from ophyd.status import DeviceStatus, StatusBase, SubscriptionStatus  # noqa: E402
from ophyd.utils.errors import StatusTimeoutError  # noqa: E402

from instruments.binding import signal_attr  # noqa: E402


class EpicsTimeout(TimeoutError):
    """A move, trigger or read over EPICS did not finish in time (the message says which)."""


class EpicsAcquisitionError(RuntimeError):
    """The IOC said the acquisition failed (its error PV)."""


class EpicsUnitsMismatch(ValueError):
    """A result PV reads in other units than the campaign file says (never mixed silently)."""


def _follow(outer: DeviceStatus, inner: StatusBase, timeout_text: str, on_success=None) -> None:
    """Finish ``outer`` as ``inner`` finishes; a timeout becomes an :class:`EpicsTimeout` saying
    ``timeout_text``, another failure keeps its exception."""

    def done(st: StatusBase) -> None:
        if outer.done:
            return
        if st.success:
            if on_success is None:
                outer.set_finished()
            else:
                on_success()
            return
        try:
            exc = st.exception(timeout=0)
        except Exception:  # noqa: BLE001 - not done: cannot happen in a callback
            exc = None
        outer.set_exception(EpicsTimeout(str(timeout_text)) if isinstance(exc, StatusTimeoutError | TimeoutError)
                            else exc or RuntimeError(f"{timeout_text.split(' did not')[0]} failed"))

    inner.add_callback(done)


class _NamedMove:
    """Mixed into each positioner: a move's status fails, on timeout, with a message naming the
    parameter, its target and where it got to."""

    move_timeout: float = 10.0
    parameter: str = ""

    def set(self, new_position: Any, *, timeout: float | None = None, moved_cb: Any = None,
            wait: bool = False) -> DeviceStatus:
        t = self.move_timeout if timeout is None else min(timeout, self.move_timeout)
        outer = DeviceStatus(self)
        if self._already_there(new_position):
            outer.set_finished()
            return outer
        inner = super().set(new_position, timeout=t, moved_cb=moved_cb)  # type: ignore[misc]

        def text() -> str:
            where = ""
            try:
                where = f"; it is at {float(self.position):g}"
            except Exception:  # noqa: BLE001 - the readback cannot be read either
                pass
            return f"the move of {self.parameter} to {new_position!r} did not finish within {t:g} s{where}"

        class _Late(str):  # the position is read when the move fails, not now
            def __str__(self) -> str:  # noqa: D105
                return text()

        _follow(outer, inner, _Late(""))
        return outer

    def _already_there(self, value: Any) -> bool:
        return False

    def _setup_move(self, position: Any) -> None:
        # ophyd's PVPositioner writes the setpoint with wait=True: a put callback with no timeout,
        # which blocks the RunEngine for ever on an IOC whose put never completes. Write and go;
        # the done signal (or the readback) says when the move is over, within the status timeout.
        if self.put_complete:  # PVPositionerPC: the put callback is the done signal
            return super()._setup_move(position)  # type: ignore[misc]
        self.setpoint.put(position, wait=False)


class _EpicsPC(_NamedMove, PVPositionerPC):
    pass


class _EpicsDone(_NamedMove, PVPositioner):
    pass


class _EpicsClose(_NamedMove, PVPositionerIsClose):
    def _already_there(self, value: Any) -> bool:
        # ophyd waits for 'done' to change; a move to where the setpoint already is changes nothing
        try:
            return float(self.setpoint.get()) == float(value) and \
                abs(float(self.readback.get()) - float(value)) <= float(self.atol)
        except Exception:  # noqa: BLE001 - not numeric: move
            return False


def _positioner_class(name: str, p: Any, pv: Any, timeout: float, connection_timeout: float) -> type:
    sig = {"timeout": timeout, "connection_timeout": connection_timeout}
    attrs: dict[str, Any] = {"parameter": name, "move_timeout": p.timeout or timeout}
    if p.put_complete:
        base = _EpicsPC
        attrs["setpoint"] = Cpt(EpicsSignal, pv(p.setpoint), put_complete=True, **sig)
        attrs["readback"] = Cpt(EpicsSignalRO, pv(p.setpoint), **sig)
    elif p.readback:
        base = _EpicsClose
        attrs["setpoint"] = Cpt(EpicsSignal, pv(p.setpoint), **sig)
        attrs["readback"] = Cpt(EpicsSignalRO, pv(p.readback), kind="hinted", **sig)
        attrs["atol"] = float(p.tolerance)
        attrs["rtol"] = 0.0
    else:
        base = _EpicsDone
        attrs["setpoint"] = Cpt(EpicsSignal, pv(p.setpoint), **sig)
        attrs["readback"] = Cpt(EpicsSignalRO, pv(p.setpoint), **sig)
        attrs["done"] = Cpt(EpicsSignalRO, pv(p.done), auto_monitor=True, **sig)
        attrs["done_value"] = p.done_value
    return type(f"EpicsPositioner_{signal_attr(name)}", (base,), attrs)


class EpicsInstrumentBase(Device):
    """Base of the generated classes; see :func:`make_epics_device`."""

    spec: Any = None
    units_given: dict[str, str] = {}

    def trigger(self) -> DeviceStatus:
        """Acquire: write the trigger PV (put completion, or busy 1 -> 0), then, with a
        ``counter``, wait for it to advance past its value before the trigger."""
        spec, t = self.spec, self.spec.timeout
        outer = DeviceStatus(self)
        if spec.trigger is None and spec.counter is None:
            outer.set_finished()
            return outer
        statuses: list[tuple[StatusBase, str]] = []
        if spec.counter is not None:
            before = self.acq_counter.get()
            statuses.append((SubscriptionStatus(
                self.acq_counter, lambda *, value, **kw: value is not None and value != before,
                timeout=t, run=True),
                f"the counter {self.acq_counter.pvname} did not advance past {before} within {t:g} s "
                "of the trigger"))
        if spec.trigger is not None:
            what = f"the trigger {self.acq_trigger.pvname}"
            if spec.trigger.busy:
                statuses.append((SubscriptionStatus(
                    self.acq_busy, lambda *, old_value, value, **kw: old_value == 1 and value == 0,
                    timeout=t, run=False),
                    f"{what}: busy {self.acq_busy.pvname} did not go from 1 to 0 within {t:g} s"))
                self.acq_trigger.put(spec.trigger.value)
            else:
                statuses.append((self.acq_trigger.set(spec.trigger.value, timeout=t),
                                 f"{what} did not complete within {t:g} s"))
        remaining = [len(statuses)]

        def one_done() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                why = self._error_text()
                if why:
                    outer.set_exception(EpicsAcquisitionError(why))
                else:
                    outer.set_finished()

        for st, text in statuses:
            _follow(outer, st, self._with_error(text), on_success=one_done)
        return outer

    def _error_text(self) -> str:
        if self.spec.trigger is None or self.spec.trigger.error is None:
            return ""
        try:
            value = self.acq_error.get(as_string=True)
        except Exception as exc:  # noqa: BLE001 - cannot read it: say so
            return f"{self.acq_error.pvname} could not be read ({exc})"
        if value in (None, "", "0", 0) or str(value).strip() in ("", "0", "0.0"):
            return ""
        return f"the acquisition failed: {self.acq_error.pvname} says {str(value).strip()!r}"

    def _with_error(self, text: str) -> str:
        instrument = self

        class _Text(str):
            def __str__(self) -> str:  # noqa: D105
                why = instrument._error_text()
                return f"{text} ({why})" if why else text

        return _Text(text)

    def describe(self) -> dict[str, Any]:
        # The PV's own units stay in the descriptor (the reader compares them with the file's);
        # the file's units fill in only where the PV gives none.
        desc = super().describe()
        for outcome, units in self.units_given.items():
            key = getattr(self, signal_attr(outcome)).name
            if key in desc and not desc[key].get("units"):
                desc[key]["units"] = units
        return desc

    def check_units(self) -> None:
        """Refuse a result PV whose own units (EGU) are not those the campaign file gives it."""
        for outcome, units in self.units_given.items():
            sig = getattr(self, signal_attr(outcome))
            own = (sig.describe().get(sig.name) or {}).get("units")
            if own and own != units:
                raise EpicsUnitsMismatch(
                    f"the campaign file says {outcome} is in {units!r} but its PV {sig.pvname} says {own!r}; "
                    f"fix 'epics.results.{outcome}.units' (or the IOC's EGU) so that they agree")


def make_epics_device(name: str, spec: Any, parameters: list[Any] = (),
                      units: dict[str, str] | None = None) -> EpicsInstrumentBase:
    """The ophyd device of an ``epics:`` block (``orchestrator.spec.EpicsSpec``), its PVs
    connected (within ``connection_timeout``); ``units`` (outcome -> units, beside the block's
    own) must agree with the result PVs' EGU, or :class:`EpicsUnitsMismatch` is raised."""
    pv = spec.pv
    sig = {"timeout": spec.timeout, "connection_timeout": spec.connection_timeout}
    attrs: dict[str, Any] = {}
    for pname, p in spec.parameters.items():
        cls = _positioner_class(pname, p, pv, spec.timeout, spec.connection_timeout)
        attrs[signal_attr(pname)] = Cpt(cls, "", settle_time=p.settle_time, kind="normal")
    for outcome, r in spec.results.items():
        attrs[signal_attr(outcome)] = Cpt(EpicsSignalRO, pv(r.pv), kind="hinted", auto_monitor=False, **sig)
    if spec.trigger is not None:
        attrs["acq_trigger"] = Cpt(EpicsSignal, pv(spec.trigger.pv), kind="omitted",
                                   put_complete=not spec.trigger.busy, **sig)
        if spec.trigger.busy:
            attrs["acq_busy"] = Cpt(EpicsSignalRO, pv(spec.trigger.busy), kind="omitted", auto_monitor=True, **sig)
        if spec.trigger.error:
            attrs["acq_error"] = Cpt(EpicsSignalRO, pv(spec.trigger.error), kind="omitted", string=True, **sig)
    if spec.counter is not None:
        attrs["acq_counter"] = Cpt(EpicsSignalRO, pv(spec.counter), kind="config", auto_monitor=True, **sig)
    attrs["spec"] = spec
    attrs["units_given"] = {o: r.units for o, r in spec.results.items() if r.units} | dict(units or {})
    cls = type("EpicsInstrument", (EpicsInstrumentBase,), attrs)
    device = cls("", name=name)
    device.wait_for_connection(timeout=spec.connection_timeout)
    device.check_units()
    return device

