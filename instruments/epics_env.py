"""EPICS on loopback: the address variables that keep Channel Access and pvAccess on this host.

Without them a Channel Access client broadcasts its searches, and a server its beacons, to the
local network. Light on purpose (no EPICS library is imported): the IOC, the epics instrument and
the tests all take them from here, before pyepics or caproto reads the environment.
"""

from __future__ import annotations

import os

#: Channel Access and pvAccess on loopback only: no search, beacon or server on the network.
LOOPBACK_ENV = {
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
}


def default_to_loopback() -> None:
    """Set each loopback variable this process has not set itself (a user's own settings win)."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
