"""Instruments: a simulated ophyd device run by an InstrumentRunner yields an Observation tied to
its bluesky run; failures and hangs end the run with the right exit status and leave the
RunEngine ready for the next trial; tables of real experiments answer with their nearest row."""

from __future__ import annotations

import math
import threading
import time

import pandas as pd
import pytest
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.status import DeviceStatus

from instruments import (
    Instrument,
    InstrumentRunner,
    InstrumentTimeout,
    MeasurementError,
    Observation,
    read_observation,
)
from simulators import Behaviour, ProblemError, load_problem, load_table, make_simulated_device
from simulators.problems import BUNDLED_DATA

SUZUKI_PARAMS = ["temperature", "pd_mol", "arbpin", "k3po4"]


def _runner(problem, name: str = "reactor", behaviour: Behaviour | None = None, timeout: float = 10.0):
    """A runner for a simulated device of ``problem``; also returns the list every document lands in."""
    device = make_simulated_device(problem, name, behaviour or Behaviour())
    docs: list[tuple[str, dict]] = []
    runner = InstrumentRunner(Instrument(name=name, device=device, outcomes=list(problem.outcomes),
                                         timeout=timeout),
                              on_document=lambda n, d: docs.append((n, d)))
    return runner, device, docs


def _only(docs, name: str) -> dict:
    found = [d for n, d in docs if n == name]
    assert len(found) == 1, f"expected one {name} document, got {len(found)}"
    return found[0]


# ---- a successful trial -----------------------------------------------------------------
def test_observation_comes_from_the_run_and_the_start_document_carries_the_metadata():
    problem = load_problem("branin")
    runner, device, streamed = _runner(problem)
    params = {"x1": 2.5, "x2": 7.0}

    observation, docs = runner.run(params, {"trial_id": 17, "campaign": "demo"})

    start = _only(docs, "start")
    assert isinstance(observation, Observation)
    assert observation.run_uid == start["uid"]
    assert start["trial_id"] == 17 and start["campaign"] == "demo"
    assert observation.values == pytest.approx(problem.evaluate(params))
    assert set(observation.values) == {"y"}
    assert _only(docs, "stop")["exit_status"] == "success"
    assert _only(docs, "stop")["run_start"] == start["uid"]
    assert [n for n, _ in docs][0] == "start" and [n for n, _ in docs][-1] == "stop"
    assert streamed == docs  # on_document saw every document, in order


def test_event_data_hold_the_parameter_setpoints_and_the_reading():
    problem = load_problem("branin")
    runner, device, _ = _runner(problem)

    observation, docs = runner.run({"x1": -3.25, "x2": 11.5}, {"trial_id": 1})

    (event,) = [d for n, d in docs if n == "event"]
    assert event["data"][device.x1.name] == -3.25
    assert event["data"][device.x2.name] == 11.5
    assert event["data"][device.y.name] == pytest.approx(observation.values["y"])
    assert device.x1.get() == -3.25  # the device was moved there


def test_runner_is_idle_after_a_trial_and_runs_the_next_one_as_a_new_run():
    problem = load_problem("branin")
    runner, _, _ = _runner(problem)

    first, _ = runner.run({"x1": 0.0, "x2": 0.0}, {"trial_id": 1})
    second, docs = runner.run({"x1": 9.0, "x2": 3.0}, {"trial_id": 2})

    assert runner.RE.state == "idle"
    assert runner.activity == "idle"
    assert first.run_uid != second.run_uid
    assert _only(docs, "start")["trial_id"] == 2  # the second run's documents only
    assert second.values == pytest.approx(problem.evaluate({"x1": 9.0, "x2": 3.0}))


def test_multi_outcome_problem_reports_every_outcome():
    problem = load_problem("branincurrin")
    runner, _, _ = _runner(problem, name="bench")
    params = {"x1": 0.25, "x2": 0.75}

    observation, _ = runner.run(params, {"trial_id": 3})

    assert set(observation.values) == {"branin", "currin"}
    assert observation.values == pytest.approx(problem.evaluate(params))


# ---- failures and hangs -----------------------------------------------------------------
def test_failing_instrument_raises_measurement_error_and_the_run_stops_with_fail():
    runner, _, docs = _runner(load_problem("branin"), name="flaky", behaviour=Behaviour(failure_rate=1.0))

    with pytest.raises(MeasurementError) as info:
        runner.run({"x1": 1.0, "x2": 2.0}, {"trial_id": 5})

    assert not isinstance(info.value, InstrumentTimeout)
    start, stop = _only(docs, "start"), _only(docs, "stop")
    assert stop["exit_status"] == "fail"
    assert start["uid"] in str(info.value)  # the message names the run
    assert not [d for n, d in docs if n == "event"]
    assert runner.RE.state == "idle"


def test_hanging_instrument_times_out_aborts_the_run_and_leaves_the_runner_usable():
    problem = load_problem("branin")
    runner, device, docs = _runner(problem, name="stuck", behaviour=Behaviour(hang_rate=1.0))

    with pytest.raises(InstrumentTimeout, match="did not finish within 0.3 s"):
        runner.run({"x1": 1.0, "x2": 2.0}, {"trial_id": 6}, timeout=0.3)

    assert _only(docs, "stop")["exit_status"] == "abort"
    assert runner.RE.state == "idle"
    assert runner.activity == "idle"

    device.behaviour = Behaviour()  # the hardware is fixed; the same runner carries on
    docs.clear()
    observation, run_docs = runner.run({"x1": 1.0, "x2": 2.0}, {"trial_id": 7})

    assert _only(run_docs, "stop")["exit_status"] == "success"
    assert _only(run_docs, "start")["trial_id"] == 7
    assert observation.values == pytest.approx(problem.evaluate({"x1": 1.0, "x2": 2.0}))


def test_instrument_timeout_is_a_measurement_error():
    assert issubclass(InstrumentTimeout, MeasurementError)


def test_reader_refuses_runs_without_a_finite_value_for_every_outcome():
    start = ("start", {"uid": "run-1"})
    stop_ok = ("stop", {"exit_status": "success", "run_start": "run-1"})
    keys = {"y": "dev_y"}

    assert read_observation([start, ("event", {"data": {"dev_y": 2.0}}), stop_ok], keys) == \
        Observation(values={"y": 2.0}, run_uid="run-1")
    with pytest.raises(MeasurementError, match="no reading 'dev_y'"):
        read_observation([start, ("event", {"data": {"other": 1.0}}), stop_ok], keys)
    with pytest.raises(MeasurementError, match="y=nan"):
        read_observation([start, ("event", {"data": {"dev_y": math.nan}}), stop_ok], keys)
    with pytest.raises(MeasurementError, match="recorded no event"):
        read_observation([start, stop_ok], keys)
    with pytest.raises(MeasurementError, match="ended with abort"):
        read_observation([start, ("stop", {"exit_status": "abort", "reason": "user"})], keys)
    with pytest.raises(MeasurementError, match="no start document"):
        read_observation([stop_ok], keys)


def test_the_reader_takes_units_from_the_device_or_the_file_and_refuses_a_disagreement():
    start, stop = ("start", {"uid": "run-1"}), ("stop", {"exit_status": "success", "run_start": "run-1"})

    def run(units: str | None) -> list:
        key = {"source": "PV:y", "dtype": "number", "shape": []} | ({"units": units} if units else {})
        return [start, ("descriptor", {"uid": "d1", "data_keys": {"dev_y": key}}),
                ("event", {"descriptor": "d1", "data": {"dev_y": 2.0}}), stop]

    keys = {"y": "dev_y"}
    assert read_observation(run("mW"), keys).units == {"y": "mW"}  # the device's (a PV's EGU)
    assert read_observation(run(None), keys, {"y": "%"}).units == {"y": "%"}  # the file's
    assert read_observation(run("mW"), keys, {"y": "mW"}).units == {"y": "mW"}
    assert read_observation(run(None), keys).units == {}
    with pytest.raises(MeasurementError, match="reads in 'W' but the campaign file says 'mW'"):
        read_observation(run("W"), keys, {"y": "mW"})


def test_units_declared_for_a_simulated_instrument_reach_the_observation():
    device = make_simulated_device(load_problem("branin"), "reactor", Behaviour())
    runner = InstrumentRunner(Instrument(name="reactor", device=device, outcomes=["y"], units={"y": "%"}))
    observation, _ = runner.run({"x1": 2.5, "x2": 7.0}, {"trial_id": 1})
    assert observation.units == {"y": "%"}


# ---- noise and drift --------------------------------------------------------------------
def _measure(device_seed: int, noise: float = 0.5, drift: float = 0.0, n: int = 3) -> list[float]:
    runner, _, _ = _runner(load_problem("branin"), behaviour=Behaviour(noise=noise, drift=drift,
                                                                       seed=device_seed))
    return [runner.run({"x1": 1.0, "x2": 2.0}, {"trial_id": i})[0].values["y"] for i in range(n)]


def test_noise_with_a_fixed_seed_is_reproducible():
    truth = load_problem("branin").evaluate({"x1": 1.0, "x2": 2.0})["y"]

    a = _measure(device_seed=11)
    b = _measure(device_seed=11)
    c = _measure(device_seed=12)

    assert a == b
    assert a != c
    assert all(v != truth for v in a)   # the noise is there
    assert len(set(a)) == 3             # and fresh for every measurement


def test_drift_adds_a_fixed_amount_per_measurement():
    truth = load_problem("branin").evaluate({"x1": 1.0, "x2": 2.0})["y"]

    values = _measure(device_seed=0, noise=0.0, drift=0.25)

    assert values == pytest.approx([truth, truth + 0.25, truth + 0.5])


# ---- tables of real experiments -----------------------------------------------------------
@pytest.mark.parametrize("source", [str(BUNDLED_DATA / "suzuki"), "suzuki"], ids=["path", "name"])
def test_table_problem_returns_the_measured_value_at_a_measured_row(source):
    problem = load_table(source)
    table = pd.read_csv(BUNDLED_DATA / "suzuki" / "data.csv")

    assert [p.name for p in problem.parameters] == SUZUKI_PARAMS
    assert problem.outcomes == ["yield"]
    for i in (0, 57, 123, len(table) - 1):
        row = table.iloc[i]
        assert problem.evaluate({p: float(row[p]) for p in SUZUKI_PARAMS}) == {"yield": float(row["yield"])}
    assert problem.optimum == {"yield": float(table["yield"].max())}


def test_table_problem_answers_a_point_between_rows_with_the_nearest_row():
    problem = load_table(BUNDLED_DATA / "suzuki")
    table = pd.read_csv(BUNDLED_DATA / "suzuki" / "data.csv")
    row = table.iloc[100]
    near = {p: float(row[p]) for p in SUZUKI_PARAMS}
    near["temperature"] += 0.01  # a hair off the measured row (range 75..90)
    near["pd_mol"] -= 0.01

    assert problem.evaluate(near) == {"yield": float(row["yield"])}


def test_table_problem_with_categoricals_matches_the_row_with_those_choices():
    problem = load_table(BUNDLED_DATA / "buchwald_a")
    table = pd.read_csv(BUNDLED_DATA / "buchwald_a" / "data.csv")
    names = [p.name for p in problem.parameters]
    outcome = problem.outcomes[0]

    for i in (0, 400, len(table) - 1):
        row = table.iloc[i]
        assert problem.evaluate({n: row[n] for n in names}) == {outcome: float(row[outcome])}


def test_table_device_run_through_the_runner_measures_the_rows_yield():
    problem = load_problem(dataset="suzuki")
    runner, _, _ = _runner(problem, name="flow-reactor")
    row = pd.read_csv(BUNDLED_DATA / "suzuki" / "data.csv").iloc[42]

    observation, _ = runner.run({p: float(row[p]) for p in SUZUKI_PARAMS}, {"trial_id": 42})

    assert observation.values == {"yield": float(row["yield"])}


def test_dataset_folder_without_dataset_yaml_names_the_missing_file(tmp_path):
    (tmp_path / "data.csv").write_text("a,y\n1,2\n")

    with pytest.raises(ProblemError, match="has no dataset.yaml") as info:
        load_table(tmp_path)

    assert str(tmp_path) in str(info.value)


def test_dataset_folder_without_data_csv_names_the_missing_file(tmp_path):
    (tmp_path / "dataset.yaml").write_text(
        "parameters:\n  - {name: a, type: float, low: 0, high: 1}\nobjectives:\n  - {name: y}\n")

    with pytest.raises(ProblemError, match="has no data.csv"):
        load_table(tmp_path)


def test_dataset_folder_that_does_not_exist_is_a_problem_error(tmp_path):
    missing = tmp_path / "no_such_table"

    with pytest.raises(ProblemError, match="no_such_table") as info:
        load_problem(dataset=missing)

    assert "dataset.yaml" in str(info.value)


def test_dataset_whose_table_lacks_a_named_column_names_the_column(tmp_path):
    (tmp_path / "dataset.yaml").write_text(
        "parameters:\n  - {name: a, type: float, low: 0, high: 1}\n"
        "  - {name: b, type: float, low: 0, high: 1}\nobjectives:\n  - {name: y}\n")
    (tmp_path / "data.csv").write_text("a,y\n0.5,2\n")

    with pytest.raises(ProblemError, match=r"\['b'\]"):
        load_table(tmp_path)


def test_unknown_simulator_and_ambiguous_source_are_problem_errors():
    with pytest.raises(ProblemError, match="unknown simulator 'rosenbrock'"):
        load_problem("rosenbrock")
    with pytest.raises(ProblemError, match="exactly one"):
        load_problem("branin", dataset="suzuki")
    with pytest.raises(ProblemError, match="exactly one"):
        load_problem()


@pytest.mark.parametrize("name", ["branin", "hartmann6", "branincurrin"])
def test_analytic_problems_declare_the_domain_of_their_botorch_function(name):
    """The bounds are written out (so reading a problem imports no BoTorch); they must be BoTorch's."""
    import botorch.test_functions as tf

    from simulators.problems import ANALYTIC

    fn = {"branin": tf.Branin(), "hartmann6": tf.Hartmann(dim=6), "branincurrin": tf.BraninCurrin()}[name]
    problem = ANALYTIC[name]()
    assert [(p.lower, p.upper) for p in problem.parameters] == [tuple(map(float, b)) for b in fn.bounds.T]


# ---- device calls that block, and statuses that fail with the device's own message -------
class _StuckSignal(Signal):
    """A parameter signal whose ``set()`` either blocks (``block_set``) or returns a status
    that never finishes (``hang_set``)."""

    def set(self, value, **kwargs):
        owner = self.parent
        if owner.block == "set":
            owner.wait_blocked()
        if owner.hang_set:
            super().put(value)
            return DeviceStatus(owner)  # never finished
        if owner.fail_set is not None:
            status = DeviceStatus(owner)
            status.set_exception(owner.fail_set)
            return status
        return super().set(value, **kwargs)


class _Reactor(Device):
    """A stand-in for a real driver: ``block`` names the call (``trigger``, ``set``, ``read``,
    ``describe``) that blocks its caller (``how``: ``sleep`` 30 s, or ``forever`` on an Event),
    ``fail_with`` is the exception its trigger status fails with."""

    x = Cpt(_StuckSignal, value=0.0, kind="normal")
    y = Cpt(Signal, value=0.0, kind="hinted")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.block: str | None = None
        self.how = "sleep"
        self.hang_set = False
        self.fail_with: BaseException | None = None
        self.fail_set: BaseException | None = None
        self.release = threading.Event()

    def wait_blocked(self) -> None:
        if self.how == "sleep":
            time.sleep(30)
        else:
            self.release.wait()

    def trigger(self):
        if self.block == "trigger":
            self.wait_blocked()
        status = DeviceStatus(self)
        if self.fail_with is not None:
            status.set_exception(self.fail_with)
        else:
            self.y.put(2.0 * self.x.get())
            status.set_finished()
        return status

    def read(self):
        if self.block == "read":
            self.wait_blocked()
        return super().read()

    def describe(self):
        if self.block == "describe":
            self.wait_blocked()
        return super().describe()


@pytest.fixture
def reactor():
    device = _Reactor(name="reactor")
    yield device
    device.release.set()  # let a thread parked in a call end with the test


def _reactor_runner(device, timeout: float = 1.0):
    docs: list[tuple[str, dict]] = []
    runner = InstrumentRunner(Instrument(name="reactor", device=device, outcomes=["y"], timeout=timeout),
                              on_document=lambda n, d: docs.append((n, d)))
    return runner, docs


def _assert_runner_recovers(runner, device) -> None:
    device.block, device.hang_set, device.fail_with, device.fail_set = None, False, None, None
    observation, docs = runner.run({"x": 1.5}, {"trial_id": 2})
    assert observation.values == {"y": 3.0}
    assert _only(docs, "stop")["exit_status"] == "success"
    assert _only(docs, "start")["trial_id"] == 2


@pytest.mark.parametrize("call", ["trigger", "set", "read", "describe"])
@pytest.mark.parametrize("how", ["sleep", "forever"])
def test_device_call_that_blocks_times_out_on_time_and_the_runner_carries_on(reactor, call, how):
    reactor.block, reactor.how = call, how
    runner, _ = _reactor_runner(reactor, timeout=1.0)

    t0 = time.monotonic()
    with pytest.raises(InstrumentTimeout) as info:
        runner.run({"x": 1.0}, {"trial_id": 1})
    elapsed = time.monotonic() - t0

    assert elapsed < 2.5, f"the 1 s timeout took {elapsed:.1f} s"
    # describe() is called by the RunEngine while it handles the first read of the device
    blocked = "read" if call == "describe" else call
    assert f"{blocked}() of reactor" in str(info.value) and "abandoned" in str(info.value)
    assert "did not finish within 1 s" in str(info.value)
    assert runner.activity == "idle"
    _assert_runner_recovers(runner, reactor)


def test_set_whose_status_never_finishes_times_out_and_the_runner_carries_on(reactor):
    reactor.hang_set = True
    runner, docs = _reactor_runner(reactor, timeout=1.0)

    t0 = time.monotonic()
    with pytest.raises(InstrumentTimeout, match="did not finish within 1 s"):
        runner.run({"x": 1.0}, {"trial_id": 1})

    assert time.monotonic() - t0 < 2.5
    assert _only(docs, "stop")["exit_status"] == "abort"
    _assert_runner_recovers(runner, reactor)


@pytest.mark.parametrize("step", ["trigger", "set"])
def test_failed_status_reports_the_devices_own_message(reactor, step):
    if step == "trigger":
        reactor.fail_with = RuntimeError("[/dev/ttyUSB0] no response")
    else:
        reactor.fail_set = RuntimeError("[/dev/ttyUSB0] no response")
    runner, docs = _reactor_runner(reactor, timeout=5.0)

    with pytest.raises(MeasurementError) as info:
        runner.run({"x": 1.0}, {"trial_id": 1})

    text = str(info.value)
    assert not isinstance(info.value, InstrumentTimeout)
    assert "[/dev/ttyUSB0] no response" in text
    assert "DeviceStatus(" not in text and "FailedStatus" not in text
    assert _only(docs, "start")["uid"] in text
    stop = _only(docs, "stop")
    assert stop["exit_status"] == "fail"
    assert "[/dev/ttyUSB0] no response" in stop["reason"]  # the ledger and stream see it too
    _assert_runner_recovers(runner, reactor)


def test_failed_status_of_a_custom_plan_still_reports_the_devices_own_message(reactor):
    """A plan factory of the campaign's own (here: bluesky's trigger_and_read) gets no help from
    our plan; the runner finds the message through FailedStatus -> status.exception()."""
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp

    def plan(device, parameters, md):
        return (yield from bpp.run_wrapper(bps.trigger_and_read([device]), md=md))

    reactor.fail_with = RuntimeError("[/dev/ttyUSB0] no response")
    runner = InstrumentRunner(Instrument(name="reactor", device=reactor, outcomes=["y"], plan=plan,
                                         timeout=5.0))

    with pytest.raises(MeasurementError) as info:
        runner.run({}, {"trial_id": 1})

    assert "[/dev/ttyUSB0] no response" in str(info.value)
    assert "DeviceStatus(" not in str(info.value)


def test_abort_returns_at_once_while_a_device_call_blocks_the_run(reactor):
    """RunEngine.abort waits for the RunEngine's loop; the runner's abort must not (the flow
    calls it to stop a campaign)."""
    reactor.block, reactor.how = "trigger", "forever"
    runner, _ = _reactor_runner(reactor, timeout=1.0)
    t = threading.Thread(target=lambda: pytest.raises(InstrumentTimeout, runner.run, {"x": 1.0}, {}),
                         daemon=True)
    t.start()
    while runner.activity != "measuring reactor":
        time.sleep(0.01)

    t0 = time.monotonic()
    runner.abort("operator stop")

    assert time.monotonic() - t0 < 0.2
    t.join(5)
    assert not t.is_alive()
    assert len(runner.abandoned) == 1 and "trigger() of reactor" in runner.abandoned[0]


def test_experiment_plan_bounds_its_status_waits_without_the_runners_watchdog(reactor):
    """Run on a bare RunEngine (no watchdog), the plan's own timeout ends a move that never
    finishes, and the stop document names it."""
    from bluesky import RunEngine

    from instruments import experiment_plan

    reactor.hang_set = True
    docs: list[tuple[str, dict]] = []
    RE = RunEngine({}, context_managers=[])
    RE.subscribe(lambda n, d: docs.append((n, d)))

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        RE(experiment_plan(reactor, {"x": 1.0}, {}, timeout=0.3))

    assert time.monotonic() - t0 < 2.0
    stop = _only(docs, "stop")
    assert stop["exit_status"] == "fail"
    assert "moving reactor_x did not finish within 0.3 s" in stop["reason"]



def test_a_latency_range_draws_each_measurement_time_from_it_reproducibly(monkeypatch):
    """``latency: [low, high]``: each measurement waits a time drawn uniformly from the range, from
    the device's seeded generator (the utilisation benchmark's instruments of varying speed)."""
    import simulators.devices as devices

    waits: list[float] = []

    monkeypatch.setattr(devices, "_wait", waits.append)  # each measurement's time, recorded, not slept
    problem = load_problem("branin")

    def times(seed: int) -> list[float]:
        waits.clear()
        runner, _, _ = _runner(problem, behaviour=Behaviour(latency=(0.5, 2.0), seed=seed))
        for _ in range(8):
            runner.run({"x1": 1.0, "x2": 2.0}, {})
        return list(waits)

    a = times(4)
    assert len(a) == 8 and all(0.5 <= t <= 2.0 for t in a), a
    assert len(set(a)) == 8 and max(a) - min(a) > 0.3, a  # drawn for each, not one fixed latency
    assert times(4) == a and times(5) != a  # the device's seed decides them
    runner, _, _ = _runner(problem, behaviour=Behaviour(latency=0.25, seed=4))
    waits.clear()
    runner.run({"x1": 1.0, "x2": 2.0}, {})
    assert waits == [0.25]
