"""Tables of real experiments: every cell is checked on load, fractions must add up, rows
without an outcome are refused or (when the table says so) failed measurements, and a
campaign on a ``kind: pool`` table picks only untried rows of it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.ledger import Ledger, sqlite_url
from planners import make_planner
from planners.base import HistoryItem, row_key
from simulators import Behaviour, ProblemError, load_table, make_simulated_device
from simulators.problems import BUNDLED_DATA, pool_rows

PLAIN_YAML = """\
name: tiny
kind: pool
parameters:
  - {name: a, type: float, low: 0, high: 1}
  - {name: n, type: int, low: 1, high: 5}
  - {name: c, type: categorical, choices: [red, blue]}
objectives:
  - {name: y, direction: maximize}
"""


def _table(folder: Path, csv: str, meta: str = PLAIN_YAML) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.yaml").write_text(meta)
    (folder / "data.csv").write_text(csv)
    return folder


# ---- every cell is checked ---------------------------------------------------------------
def test_a_blank_objective_cell_is_refused_naming_file_line_and_column(tmp_path):
    t = _table(tmp_path / "t", "a,n,c,y\n0.1,1,red,3\n0.2,2,blue,\n0.3,3,red,5\n")

    with pytest.raises(ProblemError) as info:
        load_table(t)

    msg = str(info.value)
    assert str(t / "data.csv") in msg
    assert "line 3" in msg and "'y'" in msg
    assert "missing_outcome: failed" in msg  # the fix
    assert "simulators/data/README.md" in msg


def test_a_non_numeric_cell_is_refused_naming_file_line_and_column(tmp_path):
    t = _table(tmp_path / "t", "a,n,c,y\n0.1,1,red,3\n0.2,2,blue,n.a.\n")

    with pytest.raises(ProblemError) as info:
        load_table(t)

    msg = str(info.value)
    assert str(t / "data.csv") in msg and "line 3" in msg and "'y'" in msg and "'n.a.'" in msg
    assert "could not convert" not in msg


def test_every_bad_cell_is_listed_with_its_own_line_and_column(tmp_path):
    t = _table(tmp_path / "t",
               "a,n,c,y\n"
               "1.5,1,red,3\n"      # line 2: a above high
               "0.2,2.5,blue,4\n"   # line 3: n not whole
               "0.3,9,green,5\n"    # line 4: n above high, c not a choice
               ",1,red,x\n")        # line 5: a blank, y not a number

    with pytest.raises(ProblemError) as info:
        load_table(t)

    msg = str(info.value)
    for line, column in [(2, "a"), (3, "n"), (4, "n"), (4, "c"), (5, "a"), (5, "y")]:
        assert f"line {line}, column '{column}'" in msg, (line, column, msg)
    assert "6 problems" in msg
    assert "'green'" in msg and "red" in msg and "blue" in msg  # what was found, what is allowed


def test_a_table_with_many_bad_cells_lists_the_first_ten_and_counts_the_rest(tmp_path):
    rows = "".join(f"0.{i},1,red,bad\n" for i in range(1, 10)) * 3  # 27 bad objective cells
    t = _table(tmp_path / "t", "a,n,c,y\n" + rows)

    with pytest.raises(ProblemError) as info:
        load_table(t)

    msg = str(info.value)
    assert "27 problems" in msg and "and 17 more" in msg
    assert msg.count("column 'y'") == 10


def test_a_cell_a_hair_past_a_bound_by_round_off_is_accepted(tmp_path):
    """Published bounds are often a column's extreme printed with a digit fewer (agnp)."""
    t = _table(tmp_path / "t", "a,n,c,y\n0.99999999999999995,1,red,3\n1.0000000000000002,2,blue,4\n")

    assert len(load_table(t).table) == 2


def test_a_table_whose_fractions_do_not_add_up_names_the_worst_row(tmp_path):
    meta = """\
name: blend
parameters:
  - {name: f1, type: float, low: 0, high: 1}
  - {name: f2, type: float, low: 0, high: 1}
objectives: [{name: y, direction: minimize}]
constraints:
  - {type: sum, parameters: [f1, f2], equals: 1.0}
"""
    t = _table(tmp_path / "t", "f1,f2,y\n0.5,0.5,1\n0.3,0.65,2\n0.7,0.3,3\n0.6,0.5,4\n", meta)

    with pytest.raises(ProblemError) as info:
        load_table(t)

    msg = str(info.value)
    assert "line 5" in msg and "1.1" in msg and "1e-06" in msg  # worst row, its sum, the tolerance
    assert "2 rows" in msg


def test_published_fraction_tables_load_within_the_tolerance():
    problem = load_table("photo_pce10")

    assert len(problem.table) == 1040
    assert len(pool_rows(problem)) == 1040


# ---- rows without an outcome ---------------------------------------------------------------
MISSING_YAML = PLAIN_YAML + "missing_outcome: failed\n"
MISSING_CSV = "a,n,c,y\n0.1,1,red,3\n0.2,2,blue,\n0.3,3,red,5\n0.4,4,blue,2\n"


def test_a_row_without_an_outcome_is_a_failed_measurement_when_the_table_says_so(tmp_path):
    from instruments import Instrument, InstrumentRunner, MeasurementError

    problem = load_table(_table(tmp_path / "t", MISSING_CSV, MISSING_YAML))
    device = make_simulated_device(problem, "tiny", Behaviour())
    runner = InstrumentRunner(Instrument(name="tiny", device=device, outcomes=["y"], timeout=10.0))

    assert problem.optimum == {"y": 5.0}
    with pytest.raises(MeasurementError):  # as an injected fault: the trial is recorded failed
        runner.run({"a": 0.2, "n": 2, "c": "blue"}, {"trial_id": 1})
    observation, _ = runner.run({"a": 0.3, "n": 3, "c": "red"}, {"trial_id": 2})
    assert observation.values == {"y": 5.0}


def test_an_unknown_missing_outcome_policy_is_refused(tmp_path):
    t = _table(tmp_path / "t", MISSING_CSV, PLAIN_YAML + "missing_outcome: zero\n")

    with pytest.raises(ProblemError, match="missing_outcome"):
        load_table(t)


# ---- pool mode without the polytope ----------------------------------------------------------
def _pool_problem(name: str):
    from planners.base import Problem
    from planners.space import SearchSpace

    sim = load_table(name)
    space = SearchSpace(parameters=sim.parameters, constraints=sim.constraints)
    return Problem(space=space, objectives=list(sim.objectives), pool=pool_rows(sim))


@pytest.mark.parametrize("name", ["sobol", "lhs", "grid", "bo", "random"])
def test_pool_mode_on_a_fractions_table_picks_rows_without_sampling_the_polytope(name, monkeypatch):
    import planners.baselines as baselines

    def refuse(*args, **kwargs):
        raise AssertionError("the polytope was sampled although every pool row is feasible")

    monkeypatch.setattr(baselines, "get_polytope_samples", refuse)
    monkeypatch.setattr(baselines, "sample_feasible", refuse)
    problem = _pool_problem("photo_pce10")
    history = [HistoryItem(dict(r), "completed", {"degradation": 0.1}) for r in problem.pool[:2]]
    pending = [dict(problem.pool[2])]
    planner = make_planner(name, problem, seed=3, options={"initial_trials": 5} if name == "bo" else None)

    proposals = planner.ask(4, history, pending)

    rows = {row_key(r) for r in problem.pool}
    seen = {row_key(h.parameters) for h in history} | {row_key(pending[0])}
    keys = [row_key(p.parameters) for p in proposals]
    assert len(set(keys)) == 4
    assert all(k in rows and k not in seen for k in keys)


# ---- a campaign on a pool table --------------------------------------------------------------
SUZUKI_POOL = """
name: pool-suzuki
seed: 5
parameters:
  - {name: temperature, type: float, lower: 75, upper: 90}
  - {name: pd_mol, type: float, lower: 0.5, upper: 5.0}
  - {name: arbpin, type: float, lower: 1.0, upper: 1.8}
  - {name: k3po4, type: float, lower: 1.5, upper: 3.0}
objectives: [yield: maximize]
budget: {max_trials: 12}
planner: {name: PLANNER}
instruments: [{name: flow-reactor, dataset: suzuki}]
"""


def _ran(out: Path) -> list:
    ledger = Ledger(sqlite_url(out))
    trials = ledger.trials(ledger.campaign().id)
    ledger.close()
    return trials


@pytest.mark.usefixtures("prefect_api_url")
@pytest.mark.parametrize("planner", ["sobol", "random"])
def test_campaign_on_a_pool_table_runs_distinct_rows_and_reports_a_row_as_best(planner, write_campaign,
                                                                               tmp_path):
    out = tmp_path / "run"
    path = write_campaign(SUZUKI_POOL.replace("PLANNER", planner))

    assert main(["run", str(path), "--output", str(out), "--quiet"]) == 0

    table = pd.read_csv(BUNDLED_DATA / "suzuki" / "data.csv")
    names = ["temperature", "pd_mol", "arbpin", "k3po4"]
    rows = {row_key({k: float(v) for k, v in r.items()}) for r in table[names].to_dict("records")}
    trials = _ran(out)
    keys = [row_key(t.parameters) for t in trials]
    assert len(trials) == 12 and all(t.state == "completed" for t in trials)
    assert len(set(keys)) == 12, "a row was run twice"
    assert set(keys) <= rows, "a trial ran at conditions the table does not hold"
    summary = json.loads((out / "summary.json").read_text())
    assert row_key(summary["best_parameters"]) in rows
    assert summary["best_value"] == max(t.observation.values["yield"] for t in trials)


@pytest.mark.usefixtures("prefect_api_url")
def test_campaign_on_a_pool_with_a_missing_outcome_records_that_row_failed_and_never_best(
        write_campaign, tmp_path):
    table = _table(tmp_path / "tiny", MISSING_CSV, MISSING_YAML)
    text = f"""
name: pool-missing
parameters:
  - {{name: a, type: float, lower: 0, upper: 1}}
  - {{name: n, type: int, lower: 1, upper: 5}}
  - {{name: c, type: categorical, choices: [red, blue]}}
objectives: [y: maximize]
budget: {{max_trials: 4, max_consecutive_failures: 4}}
planner: {{name: random}}
instruments: [{{name: bench, dataset: '{table}'}}]
"""
    out = tmp_path / "run"

    assert main(["run", str(write_campaign(text)), "--output", str(out), "--quiet"]) == 0

    trials = _ran(out)
    by_row = {t.parameters["a"]: t.state for t in trials}
    assert by_row == {0.1: "completed", 0.2: "failed", 0.3: "completed", 0.4: "completed"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_parameters"] == {"a": 0.3, "n": 3, "c": "red"}


def test_the_suzuki_example_plans_over_the_rows_of_its_table():
    from orchestrator.spec import load_campaign

    spec = load_campaign(Path(__file__).resolve().parents[1] / "examples" / "suzuki_table.yaml")

    assert len(spec.problem().pool) == 247


def test_ax_on_a_fractions_pool_proposes_untried_rows():
    pytest.importorskip("ax")
    problem = _pool_problem("photo_pce10")
    history = [HistoryItem(dict(r), "completed", {"degradation": 0.1 * i})
               for i, r in enumerate(problem.pool[:3])]

    proposals = make_planner("ax", problem, seed=0).ask(2, history, [])

    rows = {row_key(r) for r in problem.pool[3:]}
    assert {row_key(p.parameters) for p in proposals} <= rows and len(proposals) == 2


def test_validate_refuses_a_pool_campaign_whose_bounds_exclude_every_row(write_campaign, capsys):
    text = SUZUKI_POOL.replace("PLANNER", "sobol").replace("lower: 75, upper: 90", "lower: 95, upper: 99")

    assert main(["validate", str(write_campaign(text))]) == 2
    captured = capsys.readouterr()
    assert "no row of the pool table" in captured.out + captured.err
