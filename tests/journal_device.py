"""A simulated Branin reactor that journals, durably and before acting, every run it is asked to
make and every measurement it finishes: the record of what reached the hardware, which a crash
test holds the ledger against. ``device: tests.journal_device:make_reactor``; the journal file is
``$LABPILOT_TEST_JOURNAL``."""

from __future__ import annotations

import os
import threading

from simulators import Behaviour, load_problem, make_simulated_device

_LOCK = threading.Lock()


def journal(line: str) -> None:
    with _LOCK, open(os.environ["LABPILOT_TEST_JOURNAL"], "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def make_reactor(name: str):  # noqa: ANN201 - an ophyd device
    latency = float(os.environ.get("LABPILOT_TEST_LATENCY", "0.3"))
    device = make_simulated_device(load_problem("branin"), name, Behaviour(latency=latency))
    trigger = device.trigger

    def journaled_trigger():  # noqa: ANN202
        point = f"{float(device.x1.get())!r} {float(device.x2.get())!r}"
        journal(f"run {point}")
        status = trigger()
        status.add_callback(lambda st: journal(f"measured {point} {float(device.y.get())!r}") if st.success else None)
        return status

    device.trigger = journaled_trigger
    return device
