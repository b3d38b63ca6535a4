"""A simulator problem served as a Channel Access IOC (caproto), on loopback only.

``python -m simulators.ioc branin --prefix sim: --port 5064`` (or ``labpilot ioc branin``)
serves, for each parameter ``NAME`` of the problem:

- ``{prefix}NAME``         the setpoint; a put completes when the readback has arrived
- ``{prefix}NAME:RBV``     the readback, moving towards the setpoint at ``--speed`` units/s
- ``{prefix}NAME:MOVING``  1 while moving
- ``{prefix}SPEED``        the readbacks' speed in units/s (``--speed``; writable)

and for the measurement:

- ``{prefix}ACQUIRE``  put 1 to measure at the readbacks; the put completes when done
- ``{prefix}BUSY``     1 while measuring
- ``{prefix}OUTCOME``  one result PV per outcome (with units), plus noise and drift
- ``{prefix}COUNT``    advances after each measurement (a fresh result, not a stale one)
- ``{prefix}TRIGGERS`` advances with each acquisition asked for (ACQUIRE written), failed ones too
- ``{prefix}temperature``  a writable interlock PV (degC, 20 at start) for ``suspend_when``
- ``{prefix}ERROR``    why the last acquisition failed ('' when it did not)
- ``{prefix}FAULT_COUNT``  how many moves or acquisitions the fault hits before it clears
  itself (0: until FAULT is written again)
- ``{prefix}FAULT``    ``none``, ``hang_move`` (moves never finish), ``nan`` (NaN results),
  ``acquire_error`` (the acquisition fails), ``disconnect`` (the IOC stops answering for
  ``{prefix}FAULT_SECONDS`` seconds), ``read_error`` (after an acquisition, a read of a result PV
  is refused; its monitors go on)

:func:`start_ioc` runs it in a subprocess with the loopback environment and its own port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from instruments.epics_env import LOOPBACK_ENV

FAULTS = ["none", "hang_move", "nan", "acquire_error", "disconnect", "read_error"]
STEP_S = 0.02  # how often a moving readback is updated


def set_loopback_defaults(environ: Any = None) -> None:
    """Put the loopback settings into ``environ`` (``os.environ``) where they are not set already:
    a person's own settings win."""
    environ = os.environ if environ is None else environ
    for k, v in LOOPBACK_ENV.items():
        environ.setdefault(k, v)


def _attr(name: str) -> str:
    from instruments.binding import signal_attr

    return "p_" + signal_attr(name)


def _hook(method: str, a: str | None, cast: Any) -> Any:
    """A caproto put hook (exactly ``async def putter(group, instance, value)``) calling
    ``group.method([a,] value)``."""

    async def putter(group, instance, value):
        if group._journal and a is not None:  # a setpoint: journaled as it arrives, before it acts
            with open(group._journal, "a") as f:
                f.write(json.dumps({"pv": instance.pvname, "value": value, "t": time.time()}) + "\n")
        args = (cast(value),) if a is None else (a, cast(value))
        return await getattr(group, method)(*args)

    return putter


def make_group(problem: Any, *, speed: float = 50.0, latency: float | tuple[float, float] = 0.05,
               noise: float = 0.0,
               drift: float = 0.0, units: dict[str, str] | None = None, seed: int = 0,
               log: str | Path | None = None, journal: str | Path | None = None) -> type:
    """A caproto ``PVGroup`` class serving ``problem`` (a :class:`~simulators.problems.SimProblem`).

    ``log``: each acquisition (the readbacks it measured at, the values); ``journal``: every
    setpoint put the IOC receives, as it arrives (what reached the hardware), one JSON line each."""
    import numpy as np
    from caproto import ChannelType
    from caproto.server import PVGroup, pvproperty

    units = units or {}
    rng = np.random.default_rng(seed)
    attrs: dict[str, Any] = {}
    numeric = [p for p in problem.parameters if getattr(p, "type", "float") != "categorical"]
    categorical = [p for p in problem.parameters if getattr(p, "type", "float") == "categorical"]

    for p in numeric:
        a = _attr(p.name)
        initial = float(p.lower)
        attrs[f"{a}_rbv"] = pvproperty(value=initial, name=f"{p.name}:RBV", read_only=True, precision=4,
                                       doc=f"readback of {p.name}")
        attrs[f"{a}_moving"] = pvproperty(value=0, name=f"{p.name}:MOVING", read_only=True,
                                          doc=f"1 while {p.name} moves")
        sp = pvproperty(value=initial, name=p.name, precision=4, doc=f"setpoint of {p.name}",
                        lower_ctrl_limit=float(p.lower), upper_ctrl_limit=float(p.upper))

        attrs[a] = sp.putter(_hook("_move", a, float))
    for p in categorical:
        a = _attr(p.name)
        attrs[a] = pvproperty(value=str(p.choices[0]), name=p.name, dtype=ChannelType.STRING)
        attrs[f"{a}_rbv"] = pvproperty(value=str(p.choices[0]), name=f"{p.name}:RBV", dtype=ChannelType.STRING,
                                       read_only=True)
        attrs[a] = attrs[a].putter(_hook("_set_choice", a, str))
    async def result_getter(group, instance):
        # armed by an acquisition: a client's reads when it connects are not the ones to refuse
        if group._reads_armed and await group._fault("read_error"):
            raise RuntimeError("simulated read fault")
        return None  # the value as it is

    for o in problem.outcomes:
        attrs[f"r_{_attr(o)}"] = pvproperty(value=math.nan, name=o, read_only=True, precision=5,
                                            units=units.get(o, "a.u."), doc=f"result {o}").getter(result_getter)
    attrs["count"] = pvproperty(value=0, name="COUNT", read_only=True, doc="acquisitions finished")
    attrs["speed"] = pvproperty(value=float(speed), name="SPEED", doc="readback speed, units per second")
    attrs["triggers"] = pvproperty(value=0, name="TRIGGERS", read_only=True,
                                   doc="acquisitions asked for, failed ones included")
    attrs["temperature"] = pvproperty(value=20.0, name="temperature", precision=2, units="degC",
                                      doc="an interlock PV: write it out of range to trip a suspend_when")
    attrs["busy"] = pvproperty(value=0, name="BUSY", read_only=True, doc="1 while acquiring")
    attrs["error"] = pvproperty(value="", name="ERROR", dtype=ChannelType.STRING, read_only=True)
    attrs["fault"] = pvproperty(value="none", name="FAULT", dtype=ChannelType.ENUM, enum_strings=FAULTS)
    attrs["fault_count"] = pvproperty(value=0, name="FAULT_COUNT",
                                      doc="how many moves/acquisitions the fault hits before it clears; 0: until changed")
    attrs["fault_seconds"] = pvproperty(value=3.0, name="FAULT_SECONDS", doc="seconds a 'disconnect' lasts")
    attrs["acquire"] = pvproperty(value=0, name="ACQUIRE", doc="put 1 to measure").putter(
        _hook("_acquire", None, int))

    async def fault_putter(group, instance, value):
        group._reads_armed = False
        if value == "disconnect":
            await group.fault.write("none")  # written before the freeze, so it is not stuck on
            group._disconnect(float(group.fault_seconds.value))
            return "none"
        return value

    attrs["fault"] = attrs["fault"].putter(fault_putter)

    class Base(PVGroup):
        _generation: dict[str, int] = {}
        _journal = str(journal) if journal else None
        _reads_armed = False  # a 'read_error' fault hits the reads after an acquisition

        async def _fault(self, name: str) -> bool:
            """Whether fault ``name`` hits now; it clears after ``FAULT_COUNT`` hits (when set)."""
            if self.fault.value != name:
                return False
            left = int(self.fault_count.value)
            if left > 0:
                await self.fault_count.write(left - 1)
                if left == 1:
                    await self.fault.write("none")
            return True

        async def _move(self, a: str, target: float) -> float:
            rbv, moving = getattr(self, f"{a}_rbv"), getattr(self, f"{a}_moving")
            generation = self._generation[a] = self._generation.get(a, 0) + 1
            await moving.write(1)
            try:
                if await self._fault("hang_move"):
                    while self._generation[a] == generation:
                        await asyncio.sleep(STEP_S)  # a stuck motor: never arrives, until moved again
                    return target
                while self._generation[a] == generation:  # a newer move takes over
                    current = float(rbv.value)
                    step = max(float(self.speed.value), 1e-9) * STEP_S
                    if abs(target - current) <= step:
                        await rbv.write(target)
                        break
                    await rbv.write(current + math.copysign(step, target - current))
                    await asyncio.sleep(STEP_S)
            finally:
                if self._generation[a] == generation:
                    await moving.write(0)
            return target

        async def _set_choice(self, a: str, value: str) -> str:
            await getattr(self, f"{a}_rbv").write(value)
            return value

        async def _acquire(self, value: Any) -> Any:
            await self.triggers.write(int(self.triggers.value) + 1)
            if self.fault.value == "read_error":
                self._reads_armed = True
            await self.busy.write(1)
            await self.error.write("")
            try:
                seconds = latency if isinstance(latency, int | float) else float(rng.uniform(*latency))
                if seconds:
                    await asyncio.sleep(seconds)
                point = {p.name: float(getattr(self, f"{_attr(p.name)}_rbv").value) for p in numeric}
                point.update({p.name: getattr(self, f"{_attr(p.name)}_rbv").value for p in categorical})
                fault = self.fault.value
                if await self._fault("acquire_error"):
                    await self.error.write("simulated acquisition fault")
                    for o in problem.outcomes:
                        await getattr(self, f"r_{_attr(o)}").write(math.nan)
                    raise RuntimeError("simulated acquisition fault")
                n = int(self.count.value)
                if await self._fault("nan"):
                    values = {o: math.nan for o in problem.outcomes}
                else:
                    exact = await asyncio.get_running_loop().run_in_executor(None, problem.evaluate, point)
                    values = {o: float(exact[o]) + noise * float(rng.normal()) + drift * n
                              for o in problem.outcomes}
                for o in problem.outcomes:
                    await getattr(self, f"r_{_attr(o)}").write(values[o])
                await self.count.write(n + 1)
                if log:
                    with open(log, "a") as f:
                        f.write(json.dumps({"count": n + 1, "point": point, "values": values,
                                            "fault": fault}) + "\n")
            finally:
                await self.busy.write(0)
            return value

        def _disconnect(self, seconds: float) -> None:
            """Freeze this process for ``seconds``: clients see an IOC that stops answering."""
            subprocess.Popen(["sh", "-c", f"sleep {seconds:g}; kill -CONT {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)

    return type(f"{problem.name}_ioc", (Base,), attrs)


def serve(problem_name: str, prefix: str = "sim:", port: int | None = None, **options: Any) -> None:
    """Serve ``problem_name`` until interrupted (the loopback environment is set first)."""
    set_loopback_defaults()
    if port:
        os.environ["EPICS_CA_SERVER_PORT"] = str(port)
    from caproto.server import run

    problem = _problem(problem_name)
    # import the physics before serving
    problem.evaluate({p.name: p.choices[0] if hasattr(p, "choices") else p.lower for p in problem.parameters})
    group = make_group(problem, **options)(prefix=prefix)
    logging.getLogger("caproto.ctx").addFilter(_no_refused_beacons)
    print(f"serving {problem.name} as {prefix}* on 127.0.0.1:{os.environ.get('EPICS_CA_SERVER_PORT', 5064)}",
          flush=True)
    run(group.pvdb, interfaces=["127.0.0.1"], log_pv_names=False)


def _problem(name: str) -> Any:
    """A simulator problem by name, or ``package.module:ATTR`` naming a ``SimProblem`` of your own."""
    from simulators.problems import ProblemError, load_problem

    if ":" not in name:
        return load_problem(name)
    import importlib

    module, _, attr = name.partition(":")
    try:
        problem = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ProblemError(f"cannot load {name!r}: {exc}; give a problem name or package.module:ATTR") from exc
    return problem() if callable(problem) else problem


def _no_refused_beacons(record: logging.LogRecord) -> bool:
    """Drop caproto's trace for a beacon refused on loopback (no CA repeater listening there)."""
    exc = record.exc_info[1] if record.exc_info else None
    refused = isinstance(exc, ConnectionRefusedError) or isinstance(getattr(exc, "__cause__", None),
                                                                     ConnectionRefusedError)
    return not (refused and str(record.msg).startswith("Failed to send beacon"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("problem", help="a simulator problem (branin, hartmann6, branincurrin, ...) or "
                   "package.module:ATTR naming a SimProblem of your own")
    p.add_argument("--prefix", default="sim:", help="PV name prefix (default sim:)")
    p.add_argument("--port", type=int, default=None, help="EPICS_CA_SERVER_PORT (default 5064)")
    p.add_argument("--speed", type=float, default=50.0, help="readback speed, units per second")
    p.add_argument("--latency", type=_latency, default=0.05, metavar="S|LOW:HIGH",
                   help="seconds one acquisition takes, or LOW:HIGH drawn uniformly for each (default 0.05)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise on every result")
    p.add_argument("--drift", type=float, default=0.0, help="added to results per acquisition")
    p.add_argument("--units", action="append", default=[], metavar="OUTCOME=UNIT",
                   help="units of a result PV (default a.u.)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="append each acquisition (JSON lines) to this file")
    p.add_argument("--journal", default=None,
                   help="append every setpoint put the IOC receives (JSON lines) to this file")


def _latency(text: str) -> float | tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        value = (float(low), float(high)) if sep else float(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not seconds (0.5) or LOW:HIGH (0.5:2)") from None
    lo, hi = value if sep else (value, value)
    if not (0 <= lo <= hi and math.isfinite(hi)):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be >= 0 and LOW <= HIGH")
    return value


def run_from_args(args: argparse.Namespace) -> int:
    units = dict(u.split("=", 1) for u in args.units)
    serve(args.problem, args.prefix, args.port, speed=args.speed, latency=args.latency, noise=args.noise,
          drift=args.drift, units=units, seed=args.seed, log=args.log,
          journal=args.journal)
    return 0


# ---- running it from a test or a script ------------------------------------------------------

def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port


def pv_answers(name: str, port: int, timeout: float = 0.5) -> bool:
    """Whether an IOC on 127.0.0.1:``port`` answers a Channel Access search for ``name``
    (sent to that address only)."""
    import caproto as ca

    b = ca.Broadcaster(our_role=ca.CLIENT)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        s.sendto(b.send(ca.VersionRequest(0, ca.DEFAULT_PROTOCOL_VERSION),
                        ca.SearchRequest(name, 1, ca.DEFAULT_PROTOCOL_VERSION)), ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, addr = s.recvfrom(4096)
            except OSError:
                return False
            try:
                commands = b.recv(data, addr)
            except Exception:  # noqa: BLE001 - not a CA answer
                continue
            if any(isinstance(c, ca.SearchResponse) for c in commands):
                return True
    return False


class IocHandle:
    """A running IOC subprocess; :meth:`stop` ends it."""

    def __init__(self, process: subprocess.Popen, prefix: str, port: int, log: str | None) -> None:
        self.process, self.prefix, self.port, self.log = process, prefix, port, log

    @property
    def address(self) -> str:
        """Its entry for a client's ``EPICS_CA_ADDR_LIST``."""
        return f"127.0.0.1:{self.port}"

    def acquisitions(self) -> list[dict[str, Any]]:
        """What the IOC measured (its log), one entry per acquisition."""
        if not self.log or not Path(self.log).exists():
            return []
        return [json.loads(line) for line in Path(self.log).read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # in case a 'disconnect' froze it
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> IocHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_ioc(problem: str, prefix: str = "sim:", port: int | None = None, *, log: str | Path | None = None,
              wait: float = 60.0, extra: list[str] | None = None) -> IocHandle:
    """Start ``python -m simulators.ioc problem`` with the loopback environment and its own
    ``EPICS_CA_SERVER_PORT``; return once its PVs answer."""
    port = port or free_port()
    env = dict(os.environ)
    env.update(LOOPBACK_ENV)
    env["EPICS_CA_SERVER_PORT"] = str(port)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "simulators.ioc", problem, "--prefix", prefix, "--port", str(port)]
    if log:
        cmd += ["--log", str(log)]
    cmd += extra or []
    errors = tempfile.TemporaryFile()  # not a pipe: a chatty IOC must never block on it
    process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
    handle = IocHandle(process, prefix, port, str(log) if log else None)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            errors.seek(0)
            err = errors.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"the IOC exited with {process.returncode}: {err}")
        if pv_answers(f"{prefix}COUNT", port):
            return handle
        time.sleep(0.2)
    handle.stop()
    raise RuntimeError(f"the IOC serving {problem} did not answer on 127.0.0.1:{port} within {wait:g} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.ioc", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
