"""The Channel Access ports of this test run's IOCs, fixed once, before anything imports pyepics.

pyepics reads ``EPICS_CA_ADDR_LIST`` once, when its first context starts; every test module that
serves IOCs imports its ports from here, so the list names all of them (a module setting its own
list at import would hide the others'). Everything stays on loopback (RECIPES.md)."""

from __future__ import annotations

import os

from simulators.ioc import LOOPBACK_ENV, free_port

#: caproto simulator, EPICS base soft IOC, and two journaling stations of tests/test_epics_envelope.py
SIM, SOFT, STATION_A, STATION_B = PORTS = tuple(free_port() for _ in range(4))

os.environ.update(LOOPBACK_ENV)
os.environ["EPICS_CA_ADDR_LIST"] = " ".join(f"127.0.0.1:{p}" for p in PORTS)
