"""Device factories that campaign-file tests name in ``device: tests.lab_factories:bench``.

``bench``: validation finds it without calling it; a campaign that ran it would get no device.
``reactor_with_a_broken_station``: real simulated reactors, of which one station is broken.
"""

from __future__ import annotations

import os
from pathlib import Path


def bench():  # noqa: ANN201 - stands in for a factory that returns an ophyd device
    raise NotImplementedError("a stand-in for validation tests; it builds no device")


def reactor_with_a_broken_station(name: str):  # noqa: ANN201 - an ophyd device
    """A Branin reactor station (``LABPILOT_TEST_LATENCY`` seconds a measurement). The station
    whose name ends in ``_2`` (``reactor-2`` of ``concurrency: 3``, or ``reactor_2`` alone) fails
    every measurement at once, as a unit with a blocked line does, for as long as the file
    ``$LABPILOT_TEST_BROKEN`` exists: deleting it is the repair."""
    from simulators import Behaviour, load_problem, make_simulated_device

    latency = float(os.environ.get("LABPILOT_TEST_LATENCY", "0.2"))
    device = make_simulated_device(load_problem("branin"), name, Behaviour(latency=latency))
    if not name.endswith("_2"):
        return device
    healthy, broken = device.behaviour, Behaviour(failure_rate=1.0)
    trigger = device.trigger

    def trigger_unless_broken():  # noqa: ANN202 - an ophyd status
        device.behaviour = broken if Path(os.environ["LABPILOT_TEST_BROKEN"]).exists() else healthy
        return trigger()

    device.trigger = trigger_unless_broken
    return device


def pipeline_station(name: str):  # noqa: ANN201 - an ophyd device
    """A Branin device for a trial's step that journals (``tests.journal_device``) every setpoint
    it is sent (``set STATION PARAMETER VALUE``), each run it starts and each it finishes, so a
    test can hold what reached each station against the ledger. Seconds a measurement takes:
    ``LABPILOT_TEST_LATENCY_<NAME>`` (``REACTOR``, ``STATION``), else ``LABPILOT_TEST_LATENCY``."""
    from simulators import Behaviour, load_problem, make_simulated_device
    from tests.journal_device import journal

    latency = float(os.environ.get(f"LABPILOT_TEST_LATENCY_{name.upper()}",
                                   os.environ.get("LABPILOT_TEST_LATENCY", "0.2")))
    device = make_simulated_device(load_problem("branin"), name, Behaviour(latency=latency))
    for attr in ("x1", "x2"):
        signal = getattr(device, attr)

        def journaled_set(value, *args, _set=signal.set, _attr=attr, **kwargs):  # noqa: ANN001, ANN202
            journal(f"set {name} {_attr} {float(value)!r}")
            return _set(value, *args, **kwargs)

        signal.set = journaled_set
    trigger = device.trigger

    def journaled_trigger():  # noqa: ANN202 - an ophyd status
        journal(f"run {name}")
        status = trigger()
        status.add_callback(lambda st: journal(f"done {name}") if st.success else None)
        return status

    device.trigger = journaled_trigger
    return device
