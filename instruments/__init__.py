"""The bridge to hardware: ophyd devices, the bluesky plan of one experiment, the reader.

The names below load on first use (PEP 562), so that a light submodule (``instruments.epics_env``,
read by the simulated IOC and by ``labpilot validate``) does not bring bluesky and ophyd with it.
"""

from __future__ import annotations

from typing import Any

_HOME = {
    "Instrument": "instruments.binding", "MeasurementError": "instruments.binding",
    "Observation": "instruments.binding", "experiment_plan": "instruments.binding",
    "outcome_keys": "instruments.binding", "read_observation": "instruments.binding",
    "signal_attr": "instruments.binding", "RetryPolicy": "instruments.binding",
    "AcquisitionInterrupted": "instruments.binding",
    "InstrumentRunner": "instruments.runner", "InstrumentTimeout": "instruments.runner",
    "InterlockHeld": "instruments.runner",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'instruments' has no attribute {name!r}")
