"""The safety gate under attack: random and adversarial points, none outside the envelope passes,
none makes the gate raise; and every dispatch, of an already approved trial too, passes it."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.safety import check_point
from orchestrator.spec import SafetySpec
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
