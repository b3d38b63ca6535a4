"""The safety gate under attack: random and adversarial points, none outside the envelope passes,
none makes the gate raise; and every dispatch, of an already approved trial too, passes it."""

from __future__ import annotations

import math
from datetime import UTC

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.safety import check_point
from orchestrator.spec import SafetySpec
from planners import PLANNERS
from planners.space import (
    CategoricalParameter,
    FloatParameter,
    IntParameter,
    LinearConstraint,
    SearchSpace,
)

SPACE = SearchSpace(
    parameters=[
        FloatParameter(name="x1", lower=-5, upper=10),
        FloatParameter(name="rate", lower=0.01, upper=10, log_scale=True),
        FloatParameter(name="t", lower=0, upper=10),
        IntParameter(name="cycles", lower=1, upper=8),
        CategoricalParameter(name="solvent", choices=["water", "ethanol", 3]),
        FloatParameter(name="a", lower=0, upper=1),
        FloatParameter(name="b", lower=0, upper=1),
    ],
    constraints=[LinearConstraint.parse("x1 + 2*t <= 12"), LinearConstraint.parse("a + b == 1"),
                 LinearConstraint.parse("0.000001*t <= 0.000005")],
)
SAFETY = SafetySpec.model_validate({"limits": {"x1": {"min": -4, "max": 5}, "cycles": {"max": 6}},
                                    "rules": ["x1 - t <= 3"], "forbidden": ["x1 + t >= 8"],
                                    "allowed": {"solvent": ["water", 3]}})
NAMES = [p.name for p in SPACE.parameters]


def legal_by_hand(point: dict) -> bool:
    """The envelope, written out again without the gate's code: what may reach the device."""
    if set(point) != set(NAMES):
        return False
    x1, rate, t, cycles, solvent, a, b = (point[n] for n in NAMES)
    if any(type(v) is not float or not math.isfinite(v) for v in (x1, rate, t, a, b)):
        return False
    if type(cycles) is not int or solvent != "water" and not (type(solvent) is int and solvent == 3):
        return False  # 'ethanol' is a choice, but not an allowed one
    return (-4 <= x1 <= 5 and 0.01 <= rate <= 10 and 0 <= t <= 10 and 1 <= cycles <= 6 and 0 <= a <= 1
            and 0 <= b <= 1 and x1 + 2 * t <= 12 * (1 + 1e-5) and abs(a + b - 1) <= 1e-5
            and t <= 5 * (1 + 1e-5) and x1 - t <= 3 and not x1 + t >= 8)


weird = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.just(" 5 "), st.lists(st.integers(), max_size=2),
                  st.integers(min_value=-(10**400), max_value=10**400), st.just(float("nan")),
                  st.just(float("inf")), st.just(float("-inf")), st.just(-0.0), st.just(1e308), st.just(5e-324))
number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-20, 20),
                   st.sampled_from([-5.0, -4.0, 5.0, 10.0, 0.01, 10.0000000001, 3.0, 0.0, 1.0, 5.0000001]))
value = {"x1": st.one_of(number, weird), "rate": st.one_of(number, weird), "t": st.one_of(number, weird),
         "cycles": st.one_of(st.integers(-2, 12), st.sampled_from([2.0, 2.5, True]), weird),
         "solvent": st.one_of(st.sampled_from(["water", "ethanol", 3, "3", 3.0, True, "Water"]), weird),
         "a": st.one_of(st.floats(0, 1), number), "b": st.one_of(st.floats(0, 1), number)}


edge = st.sampled_from([-4.0, 5.0, 8.0, math.nextafter(3.0, 0.0), 5.000000001, -4.000000001, math.nextafter(5.0, 6.0), 0.01, 10.0, 3.0, 0.0,
                         1.0, -0.0, 6, 1, 7, 2.0])


@st.composite
def legal(draw) -> dict:
    """A point inside the envelope (floats, as planners send them)."""
    t = draw(st.floats(0, 5))
    x1 = draw(st.floats(-4, min(5.0, 3.0 + t, 7.999 - t)))
    a = draw(st.floats(0, 1))
    return {"x1": x1, "rate": draw(st.floats(0.01, 10)), "t": t, "cycles": draw(st.integers(1, 6)),
            "solvent": draw(st.sampled_from(["water", 3])), "a": a, "b": 1.0 - a}


@st.composite
def points(draw) -> dict:
    """Legal points, then none to three values replaced by boundary values, wrong types, NaN,
    infinities or huge numbers; sometimes a key removed or one added."""
    point = draw(legal())
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(NAMES))
        point[name] = draw(st.one_of(edge, value[name]))
    if draw(st.integers(0, 9)) == 0:
        point.pop(draw(st.sampled_from(NAMES)))
    if draw(st.integers(0, 9)) == 0:
        point[draw(st.sampled_from(["heater", "X1", "", 7]))] = draw(number)
    return point


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(st.lists(points(), min_size=100, max_size=100))
def test_ten_thousand_adversarial_points_none_outside_the_envelope_passes_none_raises(batch):
    """100 x 100 points. On main 593 of 10,000 such points passed while outside the envelope or of
    the wrong type, and 1,160 made the gate raise."""
    for point in batch:
        sent, why = check_point(point, SPACE, SAFETY)  # never raises: a raise fails the test
        assert (sent is None) != (why is None)
        if sent is not None:
            assert legal_by_hand(sent), (point, sent)


def test_legal_points_pass_and_are_sent_as_their_declared_types():
    sent, why = check_point({"x1": 1, "rate": 0.5, "t": 2.0, "cycles": 3.0, "solvent": 3, "a": 0.25, "b": 0.75},
                            SPACE, SAFETY)
    assert why is None
    assert sent == {"x1": 1.0, "rate": 0.5, "t": 2.0, "cycles": 3, "solvent": 3, "a": 0.25, "b": 0.75}
    assert type(sent["x1"]) is float and type(sent["cycles"]) is int


def test_an_undeclared_key_a_missing_one_and_wrong_types_are_vetoed():
    good = {"x1": 1.0, "rate": 0.5, "t": 2.0, "cycles": 3, "solvent": "water", "a": 0.25, "b": 0.75}
    assert "heater" in check_point({**good, "heater": 5000}, SPACE, SAFETY)[1]
    assert "lacks parameter 'x1'" in check_point({k: v for k, v in good.items() if k != "x1"}, SPACE, SAFETY)[1]
    for name, bad in [("x1", True), ("x1", " 5 "), ("x1", None), ("x1", [1]), ("x1", 10**400),
                      ("x1", float("nan")), ("cycles", 2.5), ("cycles", True), ("solvent", "3"), ("solvent", 3.0)]:
        sent, why = check_point({**good, name: bad}, SPACE, SAFETY)
        assert sent is None and why, (name, bad)


def test_a_tiny_coefficient_rule_is_as_strict_as_the_plain_one():
    """On main `0.000001*t <= 0.000005` (t <= 5) let t = 5.5 through (absolute 1e-6)."""
    point = {"x1": -3.0, "rate": 1.0, "t": 5.5, "cycles": 3, "solvent": "water", "a": 0.5, "b": 0.5}
    sent, why = check_point(point, SPACE, SafetySpec())
    assert sent is None and "breaks constraint" in why


def test_safety_limits_are_hard_no_tolerance():
    space = SearchSpace(parameters=[FloatParameter(name="x", lower=0, upper=10)])
    safety = SafetySpec.model_validate({"limits": {"x": {"max": 5}}})
    assert check_point({"x": 5.0}, space, safety)[1] is None
    assert check_point({"x": 5.000000001}, space, safety)[0] is None



def test_an_approved_trial_in_the_ledger_passes_the_gate_again_on_resume(tmp_path, prefect_api_url, monkeypatch):
    """On main a trial already `approved` skipped the gate on resume: a hand-inserted approved
    x1=1000, x2=-1000 reached the device, and so did one with an undeclared `heater: 5000`."""
    from orchestrator.cli import main
    from orchestrator.flows import CampaignRuntime
    from orchestrator.ledger import Ledger, sqlite_url
    from orchestrator.spec import load_campaign
    from planners.base import Proposal

    from .test_crash_resume import CAMPAIGN, ROOT

    journal = tmp_path / "journal.txt"
    monkeypatch.setenv("LABPILOT_TEST_JOURNAL", str(journal))
    monkeypatch.setenv("LABPILOT_TEST_LATENCY", "0.01")
    monkeypatch.syspath_prepend(str(ROOT))
    path = tmp_path / "c.yaml"
    path.write_text(CAMPAIGN.format(seed=1, trials=3, planner="sobol"))
    out = tmp_path / "run"
    runtime = CampaignRuntime(load_campaign(path), out)
    bad = [runtime.ledger.propose(runtime.campaign_id, Proposal(p, "operator", 0))
           for p in ({"x1": 1000.0, "x2": -1000.0}, {"x1": 1.0, "x2": 2.0, "heater": 5000})]
    for tid in bad:
        runtime.ledger.transition(tid, "approved", "system", "approved by hand")
    runtime.close()
    runtime.ledger.close()
    assert main(["run", str(path), "--output", str(out), "--quiet"]) == 0
    ledger = Ledger(sqlite_url(out))
    states = {t.id: t for t in ledger.trials(ledger.campaign().id)}
    assert all(states[tid].state == "vetoed" for tid in bad), [(states[t].state, states[t].reason) for t in bad]
    runs = [line for line in journal.read_text().split("\n") if line.startswith("run ")]
    assert len(runs) == 3 and not any("1000.0" in r for r in runs)
    ledger.close()


# ---- the station rules (max_step, max_trials_per_hour): check_dispatch ------------------------
def _at(seconds_ago: float):
    from datetime import datetime, timedelta

    return datetime(2025, 1, 1, 12, tzinfo=UTC) - timedelta(seconds=seconds_ago)


STATION_SAFETY = SafetySpec.model_validate({"max_step": {"x1": 2.0}, "max_trials_per_hour": {"reactor": 3}})


def test_check_dispatch_max_step_against_the_last_trial_on_the_station():
    from orchestrator.safety import check_dispatch

    now = _at(0)
    assert check_dispatch({"x1": 9.0}, "reactor", None, [], STATION_SAFETY, now) is None  # a station's first
    assert check_dispatch({"x1": 3.0}, "reactor", {"x1": 1.0}, [], STATION_SAFETY, now) is None  # exactly 2
    r = check_dispatch({"x1": 3.5}, "reactor", {"x1": 1.0}, [], STATION_SAFETY, now)
    assert r.rule == "safety.max_step.x1" and r.retry_after is None and "safety.max_step.x1" in str(r)
    for bad_last in ({"x1": float("nan")}, {"x1": "hot"}, {"x1": None}):
        r = check_dispatch({"x1": 1.0}, "reactor", bad_last, [], STATION_SAFETY, now)  # never raises
        assert r is not None and r.rule == "safety.max_step.x1" and r.retry_after is None, bad_last
    r = check_dispatch({}, "reactor", {"x1": 1.0}, [], STATION_SAFETY, now)  # a point it cannot read
    assert r is not None and r.rule == "safety.max_step.x1"


def test_check_dispatch_rate_waits_until_the_oldest_start_is_an_hour_old():
    from orchestrator.safety import check_dispatch

    now = _at(0)
    starts = [_at(3000), _at(1200), _at(60), _at(4000)]  # the last is over an hour ago: it does not count
    r = check_dispatch({"x1": 0.0}, "reactor-2", None, starts, STATION_SAFETY, now, instrument="reactor")
    assert r.rule == "safety.max_trials_per_hour" and abs(r.retry_after - 600) < 1e-6
    assert check_dispatch({"x1": 0.0}, "reactor-2", None, starts[1:], STATION_SAFETY, now, "reactor") is None
    # another instrument is not limited by {reactor: 3}; a plain number limits every station
    assert check_dispatch({"x1": 0.0}, "hplc", None, starts, STATION_SAFETY, now) is None
    every = SafetySpec.model_validate({"max_trials_per_hour": 1})
    naive = [_at(10).replace(tzinfo=None)]  # SQLite hands back times without a zone: UTC
    assert check_dispatch({}, "hplc", None, naive, every, now).retry_after > 3000
    r = check_dispatch({}, "hplc", None, [object()], every, now)  # a start time it cannot read: refused
    assert r is not None and r.rule == "safety.max_trials_per_hour" and r.retry_after is None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(point=st.fixed_dictionaries({"x1": st.one_of(number, weird)}),
       last=st.one_of(st.none(), st.fixed_dictionaries({"x1": st.one_of(number, weird)})),
       ago=st.lists(st.floats(-100, 8000), max_size=6), step=st.floats(0.1, 10), rate=st.integers(1, 4))
def test_check_dispatch_never_raises_and_never_lets_a_step_or_rate_through(point, last, ago, step, rate):
    from orchestrator.safety import check_dispatch

    safety = SafetySpec.model_validate({"max_step": {"x1": step}, "max_trials_per_hour": rate})
    r = check_dispatch(point, "s", last, [_at(a) for a in ago], safety, _at(0))
    if r is None:
        assert last is None or abs(float(point["x1"]) - float(last["x1"])) <= step
        assert sum(0 <= a < 3600 for a in ago) < rate
    else:
        assert r.rule.startswith("safety.") and str(r)


# ---- the envelope through every planner, a journaling device, the real dispatcher -------------
ENVELOPE_CAMPAIGN = """
name: envelope-{planner}
seed: 3
parameters:
  - {{name: x1, type: float, lower: -5, upper: 10}}
  - {{name: x2, type: float, lower: 0, upper: 15}}
  - {{name: solvent, type: categorical, choices: [water, ethanol, toluene]}}
objectives: [{{name: y, goal: minimize}}]
budget: {{max_trials: 6, max_wall_time: 1.5}}
planner: {{name: {planner}}}
instruments: [{{name: reactor, device: 'tests.envelope_device:make_reactor', outcomes: [y], concurrency: 2}}]
safety:
  limits: {{x2: {{max: 14}}}}
  rules: ['x1 - x2 <= 8']
  forbidden: ['x1 + x2 >= {rhs}']
  allowed: {{solvent: {allowed}}}
  max_step: {{x1: {step}}}
  max_trials_per_hour: {rate}
"""


class _Adversary:
    """The campaign's own planner, with every other proposal replaced by an attack point."""

    def __init__(self, inner, attacks: list[dict]) -> None:  # noqa: ANN001
        self.inner, self.attacks = inner, list(attacks)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def ask(self, n, history, pending, state=None):  # noqa: ANN001, ANN201
        from planners.base import Proposal

        out = list(self.inner.ask(n, history, pending, state=state))
        for i in range(0, len(out), 2):
            if self.attacks:
                out[i] = Proposal(self.attacks.pop(), "adversary", 0)
        return out


def envelope_scenario(planner: str, salt: str = "") -> dict:
    """One random envelope and six attack points for ``planner``, drawn from a generator seeded by
    its name (reproducible, and different for each planner). Not hypothesis: with one example per
    campaign, hypothesis would hand every planner its simplest example (all bounds at their
    minimum, every attack at x1 = -5), which exercises neither the step nor the rate rule."""
    import random
    import zlib

    rng = random.Random(zlib.crc32(f"{planner}{salt}".encode()))
    solvents = ["water", "ethanol", "toluene"]

    def attack() -> dict:
        return {"x1": rng.choice([rng.uniform(-5, 10), rng.choice([-5.0, 10.0, 10.5, float("nan")])]),
                "x2": rng.choice([rng.uniform(0, 15), rng.choice([0.0, 14.0, 14.5, 15.0])]),
                "solvent": rng.choice(solvents + ["acetone", 3])}

    return {"rhs": rng.uniform(8, 20), "allowed": rng.sample(solvents, rng.randint(1, 3)),
            "step": rng.uniform(3, 15), "rate": rng.randint(2, 3), "attacks": [attack() for _ in range(6)]}


def run_envelope_campaign(text: str, scenario: dict, prefix: str) -> list:
    """Run the envelope campaign ``text`` with ``scenario``'s attacks: two of them and one
    legal point approved in the ledger beforehand (an operator's, or a crashed run's), the rest
    put in place of every other proposal of the campaign's own planner. Nothing may raise; the
    campaign ends finished or failed. Returns its trials."""
    import tempfile

    import yaml

    from orchestrator.flows import CampaignRuntime, run_campaign
    from orchestrator.settings import Settings
    from orchestrator.spec import parse_campaign
    from planners.base import Proposal

    attacks = scenario["attacks"]
    spec = parse_campaign(yaml.safe_load(text))
    runtime = CampaignRuntime(spec, tempfile.mkdtemp(prefix=prefix), settings=Settings(trainer="off"))
    try:
        for p in attacks[:2] + [{"x1": 10.0, "x2": 14.0, "solvent": scenario["allowed"][0]}]:
            tid = runtime.ledger.propose(runtime.campaign_id, Proposal(dict(p), "operator", 0))
            runtime.ledger.transition(tid, "approved", "system", "approved by hand")
        runtime.planner = _Adversary(runtime.planner, attacks[2:])
        result = run_campaign(runtime)  # a raise anywhere fails the test
        trials = runtime.ledger.trials(runtime.campaign_id)
    finally:
        runtime.close()
    assert result.status in ("finished", "failed"), result.reason
    assert not [t for t in trials if t.state in ("running", "proposed")], [(t.state, t.reason) for t in trials]
    assert all(t.reason for t in trials if t.state == "vetoed")
    return trials


def assert_runs_inside_envelope(station: str, runs: list[dict], scenario: dict, step_slack: float = 0.0) -> None:
    """What one station was sent, run by run, is inside every rule of ``scenario``'s envelope."""
    for sent in runs:
        x1, x2, solvent = float(sent["x1"]), float(sent["x2"]), sent["solvent"]
        assert math.isfinite(x1 + x2), (station, sent)
        assert -5 <= x1 <= 10 and 0 <= x2 <= 14 and x1 - x2 <= 8, (station, sent)
        assert not x1 + x2 >= scenario["rhs"] and solvent in scenario["allowed"], (station, sent)
    assert len(runs) <= scenario["rate"], (station, runs)  # the campaign runs for seconds: one hour's worth
    for a, b in zip(runs, runs[1:], strict=False):
        assert abs(float(b["x1"]) - float(a["x1"])) <= scenario["step"] + step_slack, (station, a, b)


@pytest.mark.parametrize("planner", sorted(PLANNERS))
def test_every_rule_through_every_planner_nothing_outside_reaches_the_device(prefect_api_url, planner):
    """The planner's proposals, attack points among them, resumed trials and operator-added ones
    (approved in the ledger beforehand): what the device journals is inside every rule, per
    station; nothing raises; no trial is left running or unseen."""
    from .envelope_device import JOURNAL

    JOURNAL.clear()
    scenario = envelope_scenario(planner)
    text = ENVELOPE_CAMPAIGN.format(planner=planner, **{k: scenario[k] for k in ("rhs", "allowed", "step", "rate")})
    trials = run_envelope_campaign(text, scenario, "labpilot-envelope-")
    by_station: dict[str, list[dict]] = {}
    for station, sent in JOURNAL:
        assert type(sent["x1"]) is float and type(sent["x2"]) is float, sent  # as the gate converted them
        by_station.setdefault(station, []).append(sent)
    for station, runs in by_station.items():
        assert_runs_inside_envelope(station, runs, scenario)
    assert len(JOURNAL) == sum(t.state == "completed" for t in trials)
