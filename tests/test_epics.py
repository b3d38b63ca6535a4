"""A ``kind: epics`` instrument drives IOCs over Channel Access, on loopback only: the simulator
served by caproto (simulators.ioc) through whole campaigns, its faults failing trials with
reasons, and EPICS base's own soft IOC (pvxslibs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
    timeout: 30
    epics:
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
"""


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    log = tmp_path_factory.mktemp("ioc") / "acquisitions.jsonl"
    handle = start_ioc("branin", "lt:", PORT, log=log, extra=["--speed", "100"])
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def caput(ioc):
    import epics

    def put(pv: str, value):
        assert epics.caput(pv, value, wait=True, timeout=5) == 1, pv

    put("lt:FAULT", "none")
    put("lt:FAULT_COUNT", 0)
    yield put
    put("lt:FAULT", "none")


def _write(tmp_path: Path, tag: str, trials: int, epics: str = SIM_EPICS) -> Path:
    path = tmp_path / f"{tag}.yaml"
    path.write_text(CAMPAIGN.format(tag=tag, trials=trials, epics=epics))
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
    assert time.monotonic() - t0 < 30


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

    device = make_epics_device("ioc", EpicsSpec.model_validate(block))
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
        assert units == ["a.u."]  # the PV's own units


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
