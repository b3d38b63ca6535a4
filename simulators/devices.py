"""Simulated instruments as ophyd devices: parameter signals, a timed trigger, outcome readbacks.

Built on ophyd's own ``Signal`` and ``DeviceStatus`` so the plans that drive a
simulated device drive a real one unchanged. The physics is a
:class:`~simulators.problems.SimProblem` the device calls.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.status import DeviceStatus

from instruments.binding import signal_attr
from simulators.problems import SimProblem


def _wait(seconds: float) -> None:
    """A measurement's time passing (its own function, so a test can record instead of sleep)."""
    threading.Event().wait(seconds)


class InstrumentFault(RuntimeError):
    """A simulated instrument failed to measure (as a real one might)."""


@dataclass
class Behaviour:
    """How the simulated instrument behaves beyond the physics.

    latency: seconds a measurement takes, or ``(low, high)``: drawn uniformly for each
    measurement from the device's seeded generator (instruments that take a varying time). noise: standard deviation of the
    Gaussian noise added to every outcome. drift: added to outcomes per
    measurement made (a slowly drifting detector). failure_rate / hang_rate:
    probability that a measurement raises a fault / never finishes.
    """

    latency: float | tuple[float, float] = 0.0
    noise: float = 0.0
    drift: float = 0.0
    failure_rate: float = 0.0
    hang_rate: float = 0.0
    seed: int = 0


class SimulatedInstrumentBase(Device):
    """Base of the generated device classes; see :func:`make_simulated_device`."""

    problem: SimProblem
    behaviour: Behaviour

    def _setup(self, problem: SimProblem, behaviour: Behaviour) -> None:
        self.problem = problem
        self.behaviour = behaviour
        self._rng = np.random.default_rng(behaviour.seed)
        self._measurements = 0
        self._lock = threading.Lock()

    def trigger(self) -> DeviceStatus:
        """Measure at the current parameter setpoints; the status finishes after the latency.

        An ophyd ``Device.trigger()`` does not trigger its child signals, so the
        measurement happens here and is written to the outcome signals.
        """
        status = DeviceStatus(self)
        point = {p.name: getattr(self, signal_attr(p.name)).get() for p in self.problem.parameters}
        b = self.behaviour
        with self._lock:
            draw = self._rng.random()
            noise = self._rng.normal(0.0, 1.0, size=len(self.problem.outcomes))
            offset = b.drift * self._measurements
            self._measurements += 1
            latency = b.latency if isinstance(b.latency, int | float) else float(self._rng.uniform(*b.latency))

        def measure() -> None:
            if draw < b.hang_rate:
                return  # never finishes: the runner's watchdog must catch it
            if latency:
                _wait(latency)
            if draw < b.hang_rate + b.failure_rate:
                status.set_exception(InstrumentFault(f"{self.name}: simulated measurement fault"))
                return
            if self.problem.fails is not None and self.problem.fails(point):
                status.set_exception(InstrumentFault(f"{self.name}: the experiment failed at {point}"))
                return
            try:
                values = self.problem.evaluate(point)
            except Exception as exc:  # the physics itself failed: report, do not hang
                status.set_exception(exc)
                return
            for i, outcome in enumerate(self.problem.outcomes):
                getattr(self, signal_attr(outcome)).put(values[outcome] + b.noise * noise[i] + offset)
            status.set_finished()

        threading.Thread(target=measure, name=f"{self.name}-measure", daemon=True).start()
        return status


def make_simulated_device(problem: SimProblem, name: str, behaviour: Behaviour | None = None):
    """An ophyd device for ``problem``: one settable ``Signal`` per parameter (kind config),
    one readback ``Signal`` per outcome (kind hinted)."""
    reserved = set(dir(SimulatedInstrumentBase))
    names = [p.name for p in problem.parameters] + problem.outcomes
    attrs_of = [signal_attr(n) for n in names]
    clash = [n for n, a in zip(names, attrs_of, strict=True) if a in reserved or attrs_of.count(a) > 1]
    if clash:
        raise ValueError(f"names {clash} clash with ophyd Device attributes or with each other; rename them")
    attrs = {signal_attr(p.name): Cpt(Signal, value=_initial(p), kind="normal")
             for p in problem.parameters}
    attrs.update({signal_attr(o): Cpt(Signal, value=float("nan"), kind="hinted")
                  for o in problem.outcomes})
    cls = type(f"Simulated_{problem.name}", (SimulatedInstrumentBase,), attrs)
    device = cls(name=name)
    device._setup(problem, behaviour or Behaviour())
    return device


def _initial(p):
    if hasattr(p, "choices"):
        return p.choices[0]
    return p.lower
