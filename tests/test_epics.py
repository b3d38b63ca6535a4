"""A ``kind: epics`` instrument drives IOCs over Channel Access, on loopback only: the simulator
served by caproto (simulators.ioc) through whole campaigns, its faults failing trials with
reasons, and EPICS base's own soft IOC (pvxslibs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.ledger import Ledger, sqlite_url
from simulators.ioc import LOOPBACK_ENV, free_port, pv_answers, start_ioc

# this run's IOC ports (tests/conftest.py set the loopback environment before any test module loaded)
from tests.epics_ports import SIM as PORT
from tests.epics_ports import SOFT as SOFT_PORT
from tests.test_control import Running, until

HERE = Path(__file__).parent

CAMPAIGN = """
name: epics-{tag}
seed: 3
parameters:
  - {{name: x1, type: float, lower: -5, upper: 10}}
  - {{name: x2, type: float, lower: 0, upper: 15}}
objectives: [{{y: minimize}}]
budget: {{max_trials: {trials}, max_consecutive_failures: 5}}
planner: {{name: sobol}}
instruments:
  - name: ioc
    kind: epics
    timeout: {timeout}
{extra}    epics:
{epics}
"""

SIM_EPICS = """\
      prefix: 'lt:'
      parameters:
        x1: {setpoint: 'lt:x1', readback: 'lt:x1:RBV', tolerance: 0.001}
        x2: {setpoint: x2, put_complete: true}
      trigger: {pv: ACQUIRE, error: ERROR}
      counter: COUNT
      results:
        y: {pv: y, units: mW}
      timeout: 2
      connection_timeout: 30     # a loaded test machine: libca's search retries back off past 5 s
"""

SOFT_EPICS = """\
      prefix: 'soft:'
      parameters:
        x1: {setpoint: x1, readback: 'x1:RBV', tolerance: 0.0001}
        x2: {setpoint: x2, put_complete: true}
      trigger: ACQUIRE
      counter: COUNT
      results: {y: y}
      timeout: 3
      connection_timeout: 30
"""


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    log = tmp_path_factory.mktemp("ioc") / "acquisitions.jsonl"
    handle = start_ioc("branin", "lt:", PORT, log=log, extra=["--speed", "100", "--units", "y=mW"])
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def caput(ioc):
    # ophyd first: pyepics then makes its PVs of ophyd's class, and a PV this test writes (a
    # setpoint, the interlock) is the same cached PV the instrument's signals take by name
    import ophyd  # noqa: F401, I001
    import epics

    def put(pv: str, value):
        assert epics.caput(pv, value, wait=True, timeout=5, connection_timeout=20) == 1, pv

    put("lt:FAULT", "none")
    put("lt:FAULT_COUNT", 0)
    put("lt:temperature", 20.0)
    yield put
    put("lt:FAULT", "none")
    put("lt:SPEED", 100.0)
    put("lt:temperature", 20.0)


def _write(tmp_path: Path, tag: str, trials: int, epics: str = SIM_EPICS, timeout: float = 30,
           extra: str = "") -> Path:
    """A campaign file on the IOC; ``extra``: more lines of the instrument (indented 4)."""
    path = tmp_path / f"{tag}.yaml"
    path.write_text(CAMPAIGN.format(tag=tag, trials=trials, epics=epics, timeout=timeout, extra=extra))
    return path


def _trials(out: Path) -> list:
    ledger = Ledger(sqlite_url(out))
    return sorted(ledger.trials(ledger.campaign().id), key=lambda t: t.number)


def _run(path: Path, out: Path, trials: int) -> list:
    run = Running(path, out)
    run.join(60)
    rows = _trials(out)
    assert len(rows) == trials, [(t.number, t.state) for t in rows]
    return rows


def _measured(ioc, trial) -> dict:
    """The IOC's own record of the acquisition at the trial's point."""
    hits = [a for a in ioc.acquisitions()
            if all(abs(a["point"][k] - float(v)) < 1e-3 for k, v in trial.parameters.items())]
    assert hits, f"the IOC never measured at {trial.parameters}"
    return hits[-1]


@pytest.mark.usefixtures("prefect_api_url")
def test_a_campaign_drives_the_ioc_and_the_ledger_holds_what_it_measured(tmp_path, ioc, caput):
    t0 = time.monotonic()
    rows = _run(_write(tmp_path, "ok", trials=5), tmp_path / "run", 5)
    assert [t.state for t in rows] == ["completed"] * 5, [(t.state, t.reason) for t in rows]
    for t in rows:
        assert t.observation.values["y"] == _measured(ioc, t)["values"]["y"]
        assert t.observation.units == {"y": "mW"}
    assert time.monotonic() - t0 < 30
    assert main(["export", str(tmp_path / "run")]) == 0
    import pandas as pd

    frame = pd.read_csv(tmp_path / "run" / "trials.csv")
    columns = list(frame.columns)
    assert columns[columns.index("outcome.y") + 1] == "unit.y" and set(frame["unit.y"]) == {"mW"}


@pytest.mark.usefixtures("prefect_api_url")
def test_a_move_that_never_finishes_fails_its_trial_naming_the_move_and_the_campaign_goes_on(
        tmp_path, ioc, caput):
    caput("lt:FAULT_COUNT", 1)  # the next move hangs; the ones after it do not
    caput("lt:FAULT", "hang_move")
    rows = _run(_write(tmp_path, "hang", trials=3), tmp_path / "run", 3)
    assert rows[0].state == "failed"
    assert "the move of x1" in rows[0].reason and "did not finish within 2 s" in rows[0].reason
    assert [t.state for t in rows[1:]] == ["completed", "completed"], [(t.state, t.reason) for t in rows]
    for t in rows[1:]:
        assert t.observation.values["y"] == _measured(ioc, t)["values"]["y"]


@pytest.mark.usefixtures("prefect_api_url")
def test_nan_readings_fail_the_trial_with_a_reason(tmp_path, ioc, caput):
    caput("lt:FAULT_COUNT", 1)
    caput("lt:FAULT", "nan")
    rows = _run(_write(tmp_path, "nan", trials=2), tmp_path / "run", 2)
    assert rows[0].state == "failed" and "y=nan" in rows[0].reason, rows[0].reason
    assert rows[1].state == "completed"


def test_an_acquisition_the_ioc_refuses_fails_with_its_error_pv(ioc, caput):
    from instruments import Instrument, InstrumentRunner, MeasurementError
    from instruments.epics import make_epics_device
    from orchestrator.spec import EpicsSpec

    spec = EpicsSpec.model_validate({"prefix": "lt:", "parameters": {"x1": "x1", "x2": "x2"},
                                     "trigger": {"pv": "ACQUIRE", "error": "ERROR"},
                                     "results": {"y": "y"}, "counter": "COUNT", "timeout": 1})
    runner = InstrumentRunner(Instrument(name="ioc", device=make_epics_device("ioc", spec), outcomes=["y"],
                                         timeout=10))
    obs, _ = runner.run({"x1": 1.0, "x2": 2.0}, {})
    assert obs.values["y"] == ioc.acquisitions()[-1]["values"]["y"]
    caput("lt:FAULT_COUNT", 1)
    caput("lt:FAULT", "acquire_error")
    with pytest.raises((MeasurementError, TimeoutError)) as err:
        runner.run({"x1": 2.0, "x2": 3.0}, {})
    assert "lt:ERROR says 'simulated acquisition fault'" in str(err.value)


def _runner(block: dict, timeout: float = 10):
    from instruments import Instrument, InstrumentRunner
    from instruments.epics import make_epics_device
    from orchestrator.spec import EpicsSpec

    device = make_epics_device("ioc", EpicsSpec.model_validate({"connection_timeout": 30, **block}))
    return InstrumentRunner(Instrument(name="ioc", device=device, outcomes=["y"], timeout=timeout))


def test_a_done_pv_and_a_busy_trigger(ioc, caput):
    runner = _runner({"prefix": "lt:", "parameters": {
        "x1": {"setpoint": "x1", "done": "x1:MOVING", "done_value": 0},
        "x2": {"setpoint": "x2", "readback": "x2:RBV", "tolerance": 1e-6, "settle_time": 0.05}},
        "trigger": {"pv": "ACQUIRE", "busy": "BUSY"}, "results": {"y": "y"}, "counter": "COUNT", "timeout": 2})
    for x1, x2 in [(4.0, 5.0), (-2.0, 11.0)]:
        obs, docs = runner.run({"x1": x1, "x2": x2}, {})
        last = ioc.acquisitions()[-1]
        assert last["point"] == {"x1": x1, "x2": x2} and obs.values["y"] == last["values"]["y"]
        units = [d["data_keys"]["ioc_y"]["units"] for n, d in docs if n == "descriptor"]
        assert units == ["mW"] and obs.units == {"y": "mW"}  # the PV's own units


def test_an_ioc_that_stops_answering_fails_the_trial_and_the_next_one_works(ioc, caput):
    runner = _runner({"prefix": "lt:", "parameters": {"x1": "x1", "x2": "x2"}, "trigger": "ACQUIRE",
                      "results": {"y": "y"}, "counter": "COUNT", "timeout": 1})
    caput("lt:FAULT_SECONDS", 2.5)
    import epics

    epics.caput("lt:FAULT", "disconnect")  # no put completion: the IOC freezes as it takes it
    t0 = time.monotonic()
    from instruments import InstrumentTimeout

    with pytest.raises(InstrumentTimeout) as err:
        runner.run({"x1": 6.0, "x2": 1.0}, {})
    assert "did not finish within 1 s" in str(err.value) and time.monotonic() - t0 < 5
    time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
    obs, _ = runner.run({"x1": 7.0, "x2": 2.0}, {})
    assert obs.values["y"] == ioc.acquisitions()[-1]["values"]["y"]


def test_a_malformed_epics_block_is_refused_naming_the_field(tmp_path, capsys):
    bad = SIM_EPICS.replace("x2: {setpoint: x2, put_complete: true}",
                            "x2: {setpoint: x2, readback: 'x2:RBV', tolerance: 0.1, put_complete: true}")
    bad = bad.replace("y: {pv: y, units: mW}", "z: {pv: z}").replace("timeout: 2", "timeout: 2\n      speed: 3")
    assert main(["validate", str(_write(tmp_path, "bad", 2, bad))]) == 2
    err = " ".join((capsys.readouterr().err + capsys.readouterr().out).split())
    assert "instruments[0].epics.parameters.x2" in err and "put_complete" in err
    assert "instruments[0].epics.speed" in err


def test_validate_imports_no_epics(tmp_path):
    path = _write(tmp_path, "light", 2)
    code = (f"import sys; from orchestrator.cli import main; rc = main(['validate', {str(path)!r}]); "
            "bad = [m for m in ('ophyd', 'epics', 'caproto', 'bluesky') if m in sys.modules]; "
            "print(rc, bad); sys.exit(rc or bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def soft_ioc():
    """EPICS base's softIoc (pvxslibs), on loopback, with its standard input kept open."""
    env = {**os.environ, **LOOPBACK_ENV, "EPICS_CA_SERVER_PORT": str(SOFT_PORT),
           "EPICS_PVA_SERVER_PORT": str(free_port()), "EPICS_PVA_BROADCAST_PORT": str(free_port())}
    # -m before -d: the macros apply to the databases loaded after them
    proc = subprocess.Popen([sys.executable, "-m", "pvxslibs.ioc", "-m", "P=soft:", "-d",
                             str(HERE / "data" / "soft.db")], env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        until(lambda: proc.poll() is not None or pv_answers("soft:COUNT", SOFT_PORT), timeout=30,
              what="the soft IOC answering")
        assert proc.poll() is None, "the soft IOC exited"
        yield proc
    finally:
        proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.usefixtures("prefect_api_url")
def test_a_campaign_drives_epics_base_soft_ioc(tmp_path, soft_ioc):
    rows = _run(_write(tmp_path, "soft", trials=4, epics=SOFT_EPICS), tmp_path / "run", 4)
    assert [t.state for t in rows] == ["completed"] * 4, [(t.state, t.reason) for t in rows]
    for t in rows:
        x1, x2 = float(t.parameters["x1"]), float(t.parameters["x2"])
        assert t.observation.values["y"] == pytest.approx((x1 - 1) ** 2 + (x2 - 2) ** 2, rel=1e-9)


@pytest.mark.parametrize("own", [None, "10.0.0.5"])
def test_the_epics_instrument_sets_the_loopback_env_unless_the_user_did(own):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    if own:
        env["EPICS_CA_ADDR_LIST"] = own
    code = ("import os, json; import instruments.epics, epics; "
            "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('EPICS_')}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": str(HERE.parent)})
    assert done.returncode == 0, done.stderr
    seen = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert {k: seen.get(k) for k in LOOPBACK_ENV} == {**LOOPBACK_ENV, **({"EPICS_CA_ADDR_LIST": own} if own else {})}


# ---- interlocks (suspend_when), units, retried reads ---------------------------------------------

SLOW_EPICS = SIM_EPICS.replace("timeout: 2", "timeout: 6")  # moves at a few units a second


def _caget(pv: str):
    import epics

    value = epics.caget(pv, timeout=5)
    assert value is not None, pv
    return value


@pytest.mark.usefixtures("prefect_api_url")
def test_an_interlock_out_of_range_suspends_the_run_and_the_trial_completes_once_it_is_back(
        tmp_path, ioc, caput):
    """The temperature leaves its range while trial 1 moves: the run is suspended (nothing is
    acquired while out of range, and the watchdog does not time the trial out), goes on once it
    is back, and the ledger and the stream say when."""
    caput("lt:x1", 10.0)  # far from the first point (x1 -3.97, x2 3.37): long moves to trip during
    caput("lt:x2", 15.0)
    caput("lt:SPEED", 6.0)
    path = _write(tmp_path, "interlock", trials=2, epics=SLOW_EPICS, timeout=2.5, extra=(
        "    suspend_when: [{pv: 'lt:temperature', min: 10, max: 80, resume_after: 0.5}]\n"))
    out = tmp_path / "run"
    run = Running(path, out)
    heard = []
    run.runtime.ledger.listeners.append(lambda topic, body: heard.append(body) if topic == "suspension" else None)
    until(lambda: _caget("lt:x1:MOVING") == 1 or _caget("lt:x2:MOVING") == 1, what="trial 1 moving")
    triggers = _caget("lt:TRIGGERS")
    caput("lt:temperature", 95.0)
    time.sleep(3.0)  # longer than the trial's whole timeout
    assert _caget("lt:TRIGGERS") == triggers, "an acquisition happened while the interlock was out of range"
    assert [t.state for t in _trials(out)] == ["running"]
    caput("lt:SPEED", 100.0)
    caput("lt:temperature", 20.0)
    run.join(60)
    rows = _trials(out)
    assert [t.state for t in rows] == ["completed"] * 2, [(t.state, t.reason) for t in rows]
    for t in rows:
        assert t.observation.values["y"] == _measured(ioc, t)["values"]["y"]
    ledger = Ledger(sqlite_url(out))
    [held] = ledger.suspensions(ledger.campaign().id)
    assert (held.trial_id, held.instrument, held.pv, held.value, held.cleared_value) == \
        (rows[0].id, "ioc", "lt:temperature", 95.0, 20.0)
    assert 2.5 < (held.cleared_at - held.tripped_at).total_seconds() < 6
    assert (held.resumed_at - held.cleared_at).total_seconds() == pytest.approx(0.5)
    assert rows[0].started_at < held.tripped_at and held.resumed_at < rows[0].finished_at
    assert [(b["state"], b["number"], b["value"]) for b in heard] == [("tripped", 1, 95.0), ("cleared", 1, 95.0)]
    assert heard[1]["resumed_at"] == pytest.approx(held.resumed_at.replace(tzinfo=UTC).timestamp())


def test_a_trial_held_by_an_interlock_past_its_max_wait_is_given_up_and_nothing_acquired(ioc, caput):
    from instruments import Instrument, InstrumentRunner, InterlockHeld
    from instruments.epics import make_epics_device
    from instruments.interlock import epics_interlock
    from orchestrator.spec import EpicsSpec

    caput("lt:temperature", 5.0)
    spec = EpicsSpec.model_validate({"prefix": "lt:", "parameters": {"x1": "x1", "x2": "x2"},
                                     "trigger": "ACQUIRE", "results": {"y": "y"}, "counter": "COUNT", "timeout": 1})
    events = []
    runner = InstrumentRunner(Instrument(name="ioc", device=make_epics_device("ioc", spec), outcomes=["y"], timeout=10),
                              interlocks=[epics_interlock("lt:temperature", 10, None, max_wait=0.5)],
                              on_event=lambda kind, body: events.append((kind, body)))
    triggers, t0 = _caget("lt:TRIGGERS"), time.monotonic()
    with pytest.raises(InterlockHeld) as err:
        runner.run({"x1": 1.0, "x2": 2.0}, {"trial_id": 7})
    assert time.monotonic() - t0 < 3 and _caget("lt:TRIGGERS") == triggers
    assert "lt:temperature >= 10 held the run" in str(err.value) and "max_wait of 0.5 s" in str(err.value)
    assert [(k, b["what"], b["value"]) for k, b in events] == [("suspension", "tripped", 5.0)]
    caput("lt:temperature", 20.0)
    obs, _ = runner.run({"x1": 2.0, "x2": 3.0}, {"trial_id": 8})  # back in range: the next trial runs
    assert obs.values["y"] == ioc.acquisitions()[-1]["values"]["y"]
    runner.close()


def test_a_malformed_suspend_when_or_retry_is_refused_naming_the_field_and_the_fix(tmp_path, capsys):
    extra = ("    suspend_when: [{pv: 'lt:temperature', min: 80, max: 10}, {pv: 'lt:pressure'}]\n"
             "    retry: {reads: 0, acquire: 2}\n")
    assert main(["validate", str(_write(tmp_path, "bad", 2, extra=extra))]) == 2
    said = capsys.readouterr()
    err = " ".join((said.out + said.err).split())
    assert "instruments[0].suspend_when[0]" in err and "min 80 is not below max 10; swap them" in err
    assert "instruments[0].suspend_when[1]" in err and "'min', 'max' or both" in err
    assert "instruments[0].retry" in err and "'acquire' cannot be retried" in err
    sim = tmp_path / "sim.yaml"
    sim.write_text(_write(tmp_path, "x", 2).read_text().replace(
        "    kind: epics\n", "    simulator: branin\n    suspend_when: [{pv: T, max: 3}]\n    units: {z: K}\n").split(
        "    epics:")[0])
    assert main(["validate", str(sim)]) == 2
    said = capsys.readouterr()
    err = " ".join((said.out + said.err).split())
    assert "instruments[0].suspend_when" in err and "not 'simulator'" in err
    assert "instruments[0].units.z" in err and "does not measure 'z'" in err


def test_a_result_pv_in_other_units_than_the_file_says_is_refused_at_connect(ioc):
    from instruments.epics import EpicsUnitsMismatch

    with pytest.raises(EpicsUnitsMismatch) as err:
        _runner({"prefix": "lt:", "parameters": {"x1": "x1", "x2": "x2"}, "trigger": "ACQUIRE",
                 "results": {"y": {"pv": "y", "units": "W"}}, "counter": "COUNT", "timeout": 1})
    assert "says y is in 'W' but its PV lt:y says 'mW'" in str(err.value)


RETRY_EPICS = SIM_EPICS.replace("timeout: 2", "timeout: 1")


@pytest.mark.usefixtures("prefect_api_url")
def test_a_read_that_fails_is_retried_each_attempt_recorded_and_one_that_keeps_failing_fails_its_trial(
        tmp_path, ioc, caput):
    caput("lt:FAULT_COUNT", 4)  # trial 1: three reads refused (fails); trial 2: one (read again)
    caput("lt:FAULT", "read_error")
    triggers = _caget("lt:TRIGGERS")
    out = tmp_path / "run"
    rows = _run(_write(tmp_path, "retry", trials=3, epics=RETRY_EPICS,
                       extra="    retry: {reads: 3, delay: 0.1}\n"), out, 3)
    assert [t.state for t in rows] == ["failed", "completed", "completed"], [(t.state, t.reason) for t in rows]
    assert "the read of ioc failed 3 time(s)" in rows[0].reason and "Get failed" in rows[0].reason
    for t in rows[1:]:
        assert t.observation.values["y"] == _measured(ioc, t)["values"]["y"]
    assert _caget("lt:TRIGGERS") - triggers == 3  # one acquisition per trial: a read again is not one
    ledger = Ledger(sqlite_url(out))
    attempts = [(r.trial_id, r.step, r.attempt, r.attempts_allowed) for r in ledger.retries(ledger.campaign().id)]
    assert attempts == [(rows[0].id, "read of ioc", 1, 3), (rows[0].id, "read of ioc", 2, 3),
                        (rows[0].id, "read of ioc", 3, 3), (rows[1].id, "read of ioc", 1, 3)]
    assert main(["status", str(out)]) == 0


@pytest.mark.usefixtures("prefect_api_url")
def test_an_acquisition_that_fails_is_not_retried(tmp_path, ioc, caput):
    caput("lt:FAULT_COUNT", 1)
    caput("lt:FAULT", "acquire_error")
    triggers = _caget("lt:TRIGGERS")
    out = tmp_path / "run"
    rows = _run(_write(tmp_path, "acq", trials=2, epics=RETRY_EPICS, extra="    retry: {reads: 3, delay: 0.1}\n"),
                out, 2)
    assert [t.state for t in rows] == ["failed", "completed"], [(t.state, t.reason) for t in rows]
    assert "simulated acquisition fault" in rows[0].reason
    assert _caget("lt:TRIGGERS") - triggers == 2
    ledger = Ledger(sqlite_url(out))
    assert ledger.retries(ledger.campaign().id) == []


def test_two_test_workers_never_share_an_ioc_port():
    """Seen in a two-worker run: a caput timed out right after its IOC answered, because both
    workers' IOCs could be handed the same free port by the kernel."""
    from tests.epics_ports import worker_ports

    a, b = set(worker_ports(6, "gw0")), set(worker_ports(6, "gw1"))
    assert len(a) == len(b) == 6 and not a & b
