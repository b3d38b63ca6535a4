"""The Channel Access ports of this test run's IOCs, fixed once, before anything imports pyepics.

pyepics reads ``EPICS_CA_ADDR_LIST`` once, when its first context starts; every test module that
serves IOCs imports its ports from here, so the list names all of them (a module setting its own
list at import would hide the others'). Everything stays on loopback (RECIPES.md).

Each pytest-xdist worker takes its ports from a range of its own: two workers asking the kernel
for a free port at the same moment can be handed the same one, and two IOCs on one UDP port
(caproto binds it shared) answer each other's searches: a client then never connects (seen as a
caput that timed out right after its IOC answered)."""

from __future__ import annotations

import os
import random
import socket

from simulators.ioc import LOOPBACK_ENV

#: ports per worker's range, below Linux's ephemeral ports (32768-60999)
_SPAN, _BASE = 1500, 20000


def _free(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", port))
            u.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def worker_ports(n: int, worker: str | None = None) -> tuple[int, ...]:
    """``n`` ports free for TCP and UDP on 127.0.0.1, from this worker's range (``gw3``: the fourth)."""
    worker = worker if worker is not None else os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = _BASE + (index % 8) * _SPAN
    start = random.randrange(_SPAN)
    ports: list[int] = []
    for k in range(_SPAN):
        port = low + (start + k) % _SPAN
        if _free(port):
            ports.append(port)
            if len(ports) == n:
                return tuple(ports)
    raise RuntimeError(f"no {n} free ports in 127.0.0.1:{low}-{low + _SPAN - 1} for the test IOCs")


#: caproto simulator, EPICS base soft IOC, and two journaling stations of tests/test_epics_envelope.py
SIM, SOFT, STATION_A, STATION_B = PORTS = worker_ports(4)

os.environ.update(LOOPBACK_ENV)
os.environ["EPICS_CA_ADDR_LIST"] = " ".join(f"127.0.0.1:{p}" for p in PORTS)
