"""Stand-ins for hardware: analytic problems (also under a campaign's own names), tables of real
experiments, emulators fitted to them, simulated devices.

Names are loaded on first use (PEP 562), so reading a problem's parameters (``labpilot
validate``) does not import ophyd and bluesky with the simulated devices.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Behaviour": "simulators.devices", "InstrumentFault": "simulators.devices",
    "make_simulated_device": "simulators.devices",
    "ANALYTIC": "simulators.problems", "ProblemError": "simulators.problems", "SimProblem": "simulators.problems",
    "load_problem": "simulators.problems", "load_table": "simulators.problems", "regret": "simulators.problems",
    "map_problem": "simulators.rehearsal", "emulated_problem": "simulators.emulator",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'simulators' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


__all__ = sorted(_WHERE)
