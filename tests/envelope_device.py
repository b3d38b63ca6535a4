"""A simulated reactor over a mixed space (x1, x2 floats, solvent categorical) that journals, in
this process and before it measures, every setpoint it receives, with its station: the record of
what reached the hardware that tests/test_safety.py holds the safety envelope against.
``device: tests.envelope_device:make_reactor``."""

from __future__ import annotations

import math
import threading

from planners.space import CategoricalParameter, FloatParameter, Objective
from simulators import Behaviour, make_simulated_device
from simulators.problems import SimProblem

#: (station, setpoints) of every run any device of this module was asked to make
JOURNAL: list[tuple[str, dict]] = []
_LOCK = threading.Lock()
SOLVENTS = ["water", "ethanol", "toluene"]


def _evaluate(p: dict) -> dict[str, float]:
    x1, x2 = float(p["x1"]), float(p["x2"])
    y = (x2 - 5.1 / (4 * math.pi ** 2) * x1 ** 2 + 5 / math.pi * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) \
        * math.cos(x1) + 10
    return {"y": y + SOLVENTS.index(p["solvent"])}


PROBLEM = SimProblem(
    name="mixed_branin",
    parameters=[FloatParameter(name="x1", lower=-5, upper=10), FloatParameter(name="x2", lower=0, upper=15),
                CategoricalParameter(name="solvent", choices=SOLVENTS)],
    outcomes=["y"], evaluate=_evaluate, objectives=[Objective(name="y", goal="minimize")])


def make_reactor(name: str):  # noqa: ANN201 - an ophyd device
    device = make_simulated_device(PROBLEM, name, Behaviour(latency=0.01))
    trigger = device.trigger

    def journaled_trigger():  # noqa: ANN202
        with _LOCK:
            JOURNAL.append((name, {"x1": device.x1.get(), "x2": device.x2.get(), "solvent": device.solvent.get()}))
        return trigger()

    device.trigger = journaled_trigger
    return device
