"""Rehearsing a user's own campaign: a test function mapped onto its parameters, or an emulator
fitted to a table or to a past campaign's ledger (orchestrator.rehearsal, simulators.rehearsal,
simulators.emulator)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.ledger import Ledger, sqlite_url
from orchestrator.rehearsal import known_optimum, simulated_problem
from orchestrator.spec import CampaignError, load_campaign, parse_campaign
from simulators.problems import load_problem

ROOT = Path(__file__).resolve().parents[1]

REACTION = """
name: rehearse
seed: 3
parameters:
  - {name: temperature, type: float, lower: 20, upper: 80}
  - {name: time, type: float, lower: 1, upper: 100, log_scale: true}
objectives: [{yield: maximize}]
budget: {max_trials: 4}
planner: {name: sobol}
instruments:
  - name: reactor
    simulator: {problem: branin, map: {temperature: x1, time: x2}, outcomes: {yield: y}}
"""


def _spec(text: str, base_dir: Path | None = None):
    return parse_campaign(yaml.safe_load(text), base_dir=base_dir)


def _problem(text: str, seed: int = 0, base_dir: Path | None = None):
    spec = _spec(text, base_dir)
    return simulated_problem(spec.instruments[0], spec, seed)


# ---- a test function mapped onto the campaign --------------------------------------------------
def test_the_campaigns_bounds_land_on_the_problems_bounds_and_the_value_is_the_problems():
    branin = load_problem("branin")  # x1 in [-5, 10], x2 in [0, 15], y minimised
    mapped = _problem(REACTION)

    def truth(x1: float, x2: float) -> float:
        return branin.evaluate({"x1": x1, "x2": x2})["y"]

    # maximised yield on a minimised y: measured as -y
    assert mapped.evaluate({"temperature": 20, "time": 1})["yield"] == pytest.approx(-truth(-5, 0))
    assert mapped.evaluate({"temperature": 80, "time": 100})["yield"] == pytest.approx(-truth(10, 15))
    # time is searched in log space: its geometric middle is x2's middle
    assert mapped.evaluate({"temperature": 35, "time": 10})["yield"] == pytest.approx(-truth(-1.25, 7.5))
    assert mapped.outcomes == ["yield"]


def test_unmapped_inputs_are_held_fixed_and_ints_and_choices_spread_over_their_input():
    hartmann = load_problem("hartmann6")
    text = """
name: mixed
parameters:
  - {name: temperature, type: float, lower: 0, upper: 200}
  - {name: stirrer, type: int, lower: 1, upper: 5}
  - {name: solvent, type: categorical, choices: [water, ethanol, toluene, dmso]}
objectives: [{loss: minimize}]
instruments:
  - name: r
    simulator: {problem: hartmann6, map: {temperature: x2, stirrer: x1, solvent: x5}, fixed: {x3: 0.9},
                outcomes: {loss: y}}
"""
    mapped = _problem(text)

    got = mapped.evaluate({"temperature": 50, "stirrer": 2, "solvent": "toluene"})["loss"]

    # stirrer 2 of 1..5 -> 0.25; toluene, the third of four choices -> the centre of the third slice
    want = hartmann.evaluate({"x1": 0.25, "x2": 0.25, "x3": 0.9, "x4": 0.5, "x5": 0.625, "x6": 0.5})["y"]
    assert got == pytest.approx(want)  # minimised on minimised: the sign is kept


def test_the_known_optimum_is_carried_signed_only_where_the_campaign_can_reach_it():
    full = "".join(f"  - {{name: p{i}, type: float, lower: 10, upper: 20}}\n" for i in range(1, 7))
    mapping = ", ".join(f"p{i}: x{i}" for i in range(1, 7))
    text = f"""
name: full
parameters:
{full}objectives: [{{yield: maximize}}]
instruments: [{{name: r, simulator: {{problem: hartmann6, map: {{{mapping}}}, outcomes: {{yield: y}}}}}}]
"""
    assert known_optimum(_spec(text)) == {"yield": pytest.approx(3.32237)}
    five = text.replace("  - {name: p6, type: float, lower: 10, upper: 20}\n", "").replace(", p6: x6", "")
    assert known_optimum(_spec(five)) == {}  # x6 held: the optimum may be out of reach
    as_int = text.replace("{name: p1, type: float", "{name: p1, type: int")
    assert known_optimum(_spec(as_int)) == {}  # a whole-number grid misses it


def test_a_mapped_two_objective_problem_keeps_its_reference_point_and_hypervolume_signed():
    text = """
name: two
parameters:
  - {name: a, type: float, lower: 0, upper: 5}
  - {name: b, type: float, lower: 0, upper: 5}
objectives: [{gain: maximize}, {cost: minimize}]
instruments:
  - {name: r, simulator: {problem: branincurrin, map: {a: x1, b: x2}, outcomes: {gain: branin, cost: currin}}}
"""
    optimum = known_optimum(_spec(text))

    assert optimum == {"ref_gain": -18.0, "ref_cost": 6.0, "hypervolume": 59.36}


def test_a_plain_simulator_name_still_takes_the_problems_own_parameters():
    spec = load_campaign(ROOT / "examples" / "hartmann6.yaml")

    assert known_optimum(spec) == {"y": pytest.approx(-3.32237)}


@pytest.mark.parametrize("example", ["reaction_rehearsal.yaml", "suzuki_emulator.yaml"])
def test_the_rehearsal_examples_validate(example):
    assert main(["validate", str(ROOT / "examples" / example)]) == 0


# ---- malformed blocks name the field and the fix -------------------------------------------------
@pytest.mark.parametrize("old, new, path, words", [
    ("problem: branin", "problem: branine", "instruments[0].simulator.problem", "unknown simulator"),
    ("time: x2}", "time: x2, pressure: x2}", "instruments[0].simulator.map.pressure", "not a parameter"),
    ("temperature: x1, time: x2", "temperature: x1, time: x1", "instruments[0].simulator.map.time",
     "mapped twice"),
    ("temperature: x1, time: x2", "temperature: x1", "instruments[0].simulator.map", "'time' is not mapped"),
    ("temperature: x1", "temperature: x9", "instruments[0].simulator.map.temperature", "has no input 'x9'"),
    ("outcomes: {yield: y}", "outcomes: {yield: z}", "instruments[0].simulator.outcomes.yield", "not 'z'"),
    ("outcomes: {yield: y}", "outcomes: {purity: y}", "objectives[0].name", "measured by no instrument"),
    ("outcomes: {yield: y}", "fixed: {x2: 3}, outcomes: {yield: y}", "instruments[0].simulator.fixed.x2",
     "cannot also be fixed"),
], ids=["unknown-problem", "unknown-parameter", "input-twice", "unmapped-parameter", "unknown-input",
        "unknown-outcome", "outcome-not-produced", "fixed-and-mapped"])
def test_a_malformed_mapping_is_refused_naming_the_field(old, new, path, words, write_campaign):
    assert old in REACTION
    with pytest.raises(CampaignError) as err:
        load_campaign(write_campaign(REACTION.replace(old, new)))

    found = [i for i in err.value.issues if i.path == path]
    assert found and words in found[0].message, err.value.issues


# ---- an emulator fitted to a table ------------------------------------------------------------
SIGMA = 0.3


def _truth(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sin(3 * a / 100) + (b - 0.5) ** 2


def _table(path: Path, rows: int = 80, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 100, rows), rng.uniform(0, 1, rows)
    pd.DataFrame({"temperature": a, "ratio": b,
                  "yield": _truth(a, b) + rng.normal(0, SIGMA, rows)}).to_csv(path, index=False)
    return path


def _emulated(source: str, model: str = "gp", noise: str = "true") -> str:
    return f"""
name: emulated
seed: 5
parameters:
  - {{name: temperature, type: float, lower: 0, upper: 100}}
  - {{name: ratio, type: float, lower: 0, upper: 1}}
objectives: [{{yield: maximize}}]
budget: {{max_trials: 4}}
planner: {{name: sobol}}
instruments: [{{name: reactor, emulator: {{{source}, model: {model}, noise: {noise}}}}}]
"""


def test_an_emulators_measurements_have_the_noise_of_the_data(tmp_path):
    _table(tmp_path / "past.csv", rows=120)
    problem = _problem(_emulated("table: past.csv"), seed=1, base_dir=tmp_path)
    point = {"temperature": 50.0, "ratio": 0.5}

    draws = np.array([problem.evaluate(point)["yield"] for _ in range(400)])

    assert draws.std() == pytest.approx(SIGMA, rel=0.25)
    assert draws.mean() == pytest.approx(float(_truth(np.array(50.0), np.array(0.5))), abs=0.15)
    again = _problem(_emulated("table: past.csv"), seed=1, base_dir=tmp_path)
    assert [again.evaluate(point)["yield"] for _ in range(3)] == pytest.approx(draws[:3].tolist())


def test_an_emulator_without_noise_returns_its_mean(tmp_path):
    _table(tmp_path / "past.csv")
    problem = _problem(_emulated("table: past.csv", noise="false"), base_dir=tmp_path)

    draws = {problem.evaluate({"temperature": 30.0, "ratio": 0.2})["yield"] for _ in range(5)}

    assert len(draws) == 1


def test_an_ensemble_emulator_learns_the_tables_trend(tmp_path):
    _table(tmp_path / "past.csv", rows=120)
    problem = _problem(_emulated("table: past.csv", model="ensemble", noise="false"), base_dir=tmp_path)

    low = problem.evaluate({"temperature": 50.0, "ratio": 0.5})["yield"]   # truth 1.0
    high = problem.evaluate({"temperature": 50.0, "ratio": 0.0})["yield"]  # truth 1.25 (sin(1.5) + .25)

    assert abs(low - 0.997) < 0.3 and high > low - 0.1


def test_a_past_campaigns_ledger_is_an_emulator_source(tmp_path):
    rng = np.random.default_rng(2)
    ledger = Ledger.for_directory(tmp_path / "past")
    campaign, _ = ledger.open_campaign("last-week", {}, seed=0)
    for a, b in zip(rng.uniform(0, 100, 60), rng.uniform(0, 1, 60), strict=True):
        y = float(_truth(a, b) + rng.normal(0, 0.05))
        ledger.record_import(campaign, {"temperature": float(a), "ratio": float(b)}, {"yield": y}, "test", "past")
    ledger.close()

    problem = _problem(_emulated("ledger: past", noise="false"), base_dir=tmp_path)

    for a, b in [(20.0, 0.3), (70.0, 0.8)]:
        got = problem.evaluate({"temperature": a, "ratio": b})["yield"]
        assert got == pytest.approx(float(_truth(np.array(a), np.array(b))), abs=0.15)
    with pytest.raises(CampaignError, match="holds no campaign 'yesterday'"):
        _spec(_emulated("ledger: past, campaign: yesterday"), tmp_path)


@pytest.mark.parametrize("source, prepare, words", [
    ("table: nowhere.csv", None, "no such file"),
    ("table: past.csv", lambda d: pd.DataFrame({"temperature": [1.0], "yield": [2.0]}).to_csv(d / "past.csv"),
     "has no column ['ratio']"),
    ("table: past.csv", lambda d: _table(d / "past.csv", rows=4), "4 of its 4 rows are usable"),
    ("table: past.csv", lambda d: pd.DataFrame({"temperature": np.linspace(200, 300, 20), "ratio": 0.5,
                                                "yield": 1.0}).to_csv(d / "past.csv"),
     "temperature outside the campaign's bounds"),
    ("ledger: empty", lambda d: (d / "empty").mkdir(), "holds no ledger.sqlite"),
], ids=["missing-file", "missing-column", "too-few-rows", "rows-outside-bounds", "no-ledger"])
def test_a_malformed_emulator_source_is_refused_naming_the_field(source, prepare, words, tmp_path):
    if prepare:
        prepare(tmp_path)
    with pytest.raises(CampaignError) as err:
        _spec(_emulated(source), tmp_path)

    key = "instruments[0].emulator." + source.split(":")[0]
    found = [i for i in err.value.issues if i.path == key]
    assert found and words in found[0].message, err.value.issues


def test_an_emulator_takes_one_source():
    with pytest.raises(CampaignError) as err:
        _spec(_emulated("table: a.csv, ledger: runs/x"))

    assert any(i.path == "instruments[0].emulator" and "exactly one" in i.message for i in err.value.issues)


# ---- whole campaigns -----------------------------------------------------------------------
@pytest.mark.usefixtures("prefect_api_url")
def test_a_whole_campaign_rehearses_on_a_mapped_simulator_and_on_an_emulator(write_campaign, tmp_path):
    branin = load_problem("branin")
    out = tmp_path / "mapped"
    assert main(["run", str(write_campaign(REACTION)), "--output", str(out), "--quiet"]) == 0

    ledger = Ledger(sqlite_url(out))
    trials = ledger.trials(ledger.campaign().id)
    assert [t.state for t in trials] == ["completed"] * 4
    for t in trials:  # each measurement is -branin at the mapped point
        p = t.parameters
        x1 = -5 + 15 * (p["temperature"] - 20) / 60
        x2 = 15 * math.log(p["time"]) / math.log(100)
        assert t.observation.values["yield"] == pytest.approx(-branin.evaluate({"x1": x1, "x2": x2})["y"])
    ledger.close()

    _table(tmp_path / "past.csv")
    out = tmp_path / "emulated"
    path = write_campaign(_emulated("table: past.csv"), name="emulated.yaml")
    assert main(["run", str(path), "--output", str(out), "--quiet"]) == 0

    ledger = Ledger(sqlite_url(out))
    trials = ledger.trials(ledger.campaign().id)
    assert [t.state for t in trials] == ["completed"] * 4
    values = [t.observation.values["yield"] for t in trials]
    assert all(math.isfinite(v) and -2 < v < 3 for v in values) and len(set(values)) == 4
    ledger.close()
