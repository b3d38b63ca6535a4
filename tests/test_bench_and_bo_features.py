"""The benchmark command, and the BO features a lab relies on: pools, failures, constraints."""

from __future__ import annotations

import json

import pytest

from orchestrator.bench import parse_problem
from orchestrator.cli import main
from planners import make_planner
from planners.base import HistoryItem, Problem, row_key
from planners.bo import tail_unwarp, tail_warp
from planners.space import FloatParameter, Objective, OutcomeConstraint, SearchSpace
from simulators import load_problem
from simulators.problems import BUNDLED_DATA

FAST = {"num_restarts": 2, "raw_samples": 64, "mc_samples": 32}


def test_bench_writes_json_keyed_by_problem_then_planner_with_every_metric(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--problems", "branin,branincurrin-noisy", str(BUNDLED_DATA / "suzuki"),
                 "--planners", "random,sobol,bo", "--seeds", "2", "--budget", "8", "--batch", "2",
                 "--initial", "4", "--out", str(out), "--quiet",
                 "--options", json.dumps({"bo": FAST})])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) == {"branin", "branincurrin-noisy", "suzuki"}
    for planners in result.values():
        assert set(planners) == {"random", "sobol", "bo"}
        for m in planners.values():
            ps = m["proposal_seconds"]
            assert ps["calls"] == 2 * 2 and ps["median"] >= 0 and ps["p90"] >= ps["median"]
    for name in ("random", "sobol", "bo"):
        b = result["branin"][name]
        assert len(b["best_so_far"]) == 2 and all(len(t) == 8 for t in b["best_so_far"])
        assert all(x >= y for t in b["best_so_far"] for x, y in zip(t, t[1:], strict=False))  # never worse
        assert b["simple_regret"]["median"] >= 0 and len(b["simple_regret"]["iqr"]) == 2
        hv = result["branincurrin-noisy"][name]["hypervolume"]
        assert hv["max_possible"] == pytest.approx(59.36) and 0 <= hv["median"] <= 59.36
        pool = result["suzuki"][name]
        assert 0 <= pool["top_percent"]["final"]["median"] <= 1
        assert pool["enhancement_factor"]["at_budget"] >= 0
        assert set(pool["acceleration_factor"]) == {"0.25", "0.5", "0.75", "1.0"}
    # The initial design is paired: every planner's first 4 trials are the same points.
    sobol_first = result["branin"]["sobol"]["best_so_far"][0][:4]
    assert result["branin"]["bo"]["best_so_far"][0][:4] == sobol_first
    assert result["branin"]["random"]["best_so_far"][0][:4] == sobol_first
    assert "| planner |" in (tmp_path / "bench.md").read_text()


def test_bench_refuses_an_unknown_problem_or_planner_with_exit_2(tmp_path, capsys):
    assert main(["bench", "--problems", "rosenbrock", "--planners", "bo", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown problem 'rosenbrock'" in capsys.readouterr().err
    assert main(["bench", "--problems", "branin", "--planners", "magic", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown planner" in capsys.readouterr().err


def test_tail_warp_is_monotone_and_inverts():
    import torch

    u = torch.tensor([-300.0, -50.0, -3.0, -1.0, -0.5, -0.41, -0.40])
    w, (c, s) = tail_warp(u)
    assert torch.all(w[1:] > w[:-1])
    assert torch.allclose(tail_unwarp(w, c, s), u, atol=1e-9)
    assert w[0] - w[1] < (u[1] - u[0]) / s  # the bad tail is compressed


def _pool_problem():
    bp = parse_problem(str(BUNDLED_DATA / "buchwald_a"))
    assert bp.problem.pool is not None and len(bp.problem.pool) == 792
    return bp


@pytest.mark.parametrize("name", ["random", "sobol", "lhs", "bo"])
def test_pool_mode_proposes_only_untried_rows_of_the_table(name):
    bp = _pool_problem()
    problem = bp.problem
    history = [HistoryItem(dict(row), "completed", {"yield": float(i)}) for i, row in enumerate(problem.pool[:6])]
    pending = [dict(problem.pool[6])]
    planner = make_planner(name, problem, seed=1, options=FAST | {"initial_trials": 5} if name == "bo" else None)
    proposals = planner.ask(3, history, pending)
    rows = {row_key(r) for r in problem.pool}
    seen = {row_key(h.parameters) for h in history} | {row_key(pending[0])}
    keys = [row_key(p.parameters) for p in proposals]
    assert len(set(keys)) == 3
    assert all(k in rows and k not in seen for k in keys)


def test_bo_learns_where_experiments_fail_and_proposes_elsewhere():
    """On Branin failing where x2 > 9 - 0.4 x1, after a few failures most BO proposals avoid it,
    while without the feasibility model the same history sends more of them there."""
    sim = load_problem("branin_failing")
    problem = Problem(space=SearchSpace(parameters=sim.parameters), objectives=list(sim.objectives))
    sobol = make_planner("sobol", problem, seed=3)
    history: list[HistoryItem] = []
    for _ in range(14):
        p = sobol.ask(1, history, [])[0].parameters
        history.append(HistoryItem(p, "failed") if sim.fails(p) else HistoryItem(p, "completed", sim.evaluate(p)))
    assert sum(h.state == "failed" for h in history) >= 4

    def failing_share(feasibility: bool) -> float:
        bo = make_planner("bo", problem, seed=5, options=FAST | {"feasibility_model": feasibility})
        proposals = bo.ask(6, history, [])
        return sum(sim.fails(p.parameters) for p in proposals) / len(proposals)

    with_model = failing_share(True)
    assert with_model <= 1 / 6
    assert with_model <= failing_share(False)


def test_bo_respects_an_outcome_constraint_it_has_learnt():
    """Maximise y = x while 'c <= 0.3' with c = x: the best feasible point is x = 0.3, and
    proposals should stay near or below it rather than run to x = 1."""
    space = SearchSpace(parameters=[FloatParameter(name="x", lower=0, upper=1),
                                    FloatParameter(name="z", lower=0, upper=1)])
    problem = Problem(space=space, objectives=[Objective(name="y", goal="maximize")],
                      outcome_constraints=[OutcomeConstraint.parse("c <= 0.3")])
    xs = [0.05, 0.15, 0.25, 0.45, 0.6, 0.8, 0.95, 0.35]
    history = [HistoryItem({"x": x, "z": 0.5}, "completed", {"y": x, "c": x}) for x in xs]
    bo = make_planner("bo", problem, seed=0, options=FAST)
    proposals = bo.ask(2, history, [])
    assert all(p.parameters["x"] < 0.45 for p in proposals), [p.parameters for p in proposals]
    assert set(proposals[0].predicted_mean) == {"y", "c"}


def test_bo_with_a_target_objective_aims_at_the_target():
    space = SearchSpace(parameters=[FloatParameter(name="x", lower=0, upper=1)])
    problem = Problem(space=space, objectives=[Objective(name="y", goal="target", target=0.62)])
    xs = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    history = [HistoryItem({"x": x}, "completed", {"y": x}) for x in xs]
    proposal = make_planner("bo", problem, seed=0, options=FAST).ask(1, history, [])[0]
    assert abs(proposal.parameters["x"] - 0.62) < 0.08
    assert proposal.predicted_mean["y"] == pytest.approx(proposal.parameters["x"], abs=0.05)


@pytest.mark.parametrize("name", ["lhs", "grid"])
def test_space_filling_baselines_give_legal_distinct_points(name):
    sim = load_problem("hartmann6")
    problem = Problem(space=SearchSpace(parameters=sim.parameters), objectives=list(sim.objectives))
    planner = make_planner(name, problem, seed=0)
    history: list[HistoryItem] = []
    points = []
    for _ in range(4):
        batch = planner.ask(3, history, [])
        for p in batch:
            problem.space.validate_point(p.parameters)
            points.append(row_key(p.parameters))
            history.append(HistoryItem(p.parameters, "completed", sim.evaluate(p.parameters)))
    assert len(set(points)) == 12


# ---- the bench: what it refuses up front, what it keeps when a run fails, what it reports ----
def _write_table(folder, rows: list[dict], parameters: list[str], objective: str = "y",
                 constraint: str = "", kind: str = "pool") -> str:
    """A dataset folder (``data.csv`` + ``dataset.yaml``, pool kind unless told) in ``folder``; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [*parameters, objective]
    (folder / "data.csv").write_text("\n".join([",".join(names)]
                                               + [",".join(str(r[n]) for n in names) for r in rows]) + "\n")
    (folder / "dataset.yaml").write_text(
        f"name: {folder.name}\nkind: {kind}\nparameters:\n"
        + "".join(f"  - {{name: {p}, type: float, low: 0.0, high: 1.0}}\n" for p in parameters)
        + f"objectives:\n  - {{name: {objective}, direction: maximize}}\n" + constraint)
    return str(folder)


def _fractions_table(tmp_path) -> str:
    """12 rows of two fractions that add up to 1, as a continuous space (not a pool): an equality
    constraint, which Ax cannot express (on a pool Ax needs none: every row satisfies it)."""
    rows = [{"a": i / 11, "b": 1 - i / 11, "y": -((i / 11 - 0.3) ** 2)} for i in range(12)]
    return _write_table(tmp_path / "fractions", rows, ["a", "b"], kind="continuous",
                        constraint="constraints:\n  - {type: sum, parameters: [a, b], equals: 1.0}\n")


def test_bench_refuses_a_planner_that_cannot_take_a_problem_before_running_anything(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--problems", "branin", _fractions_table(tmp_path), "--planners", "random,ax",
                 "--seeds", "1", "--budget", "6", "--initial", "3", "--out", str(out), "--quiet"])

    assert code == 2
    err = capsys.readouterr().err
    assert "planner 'ax' on problem 'fractions'" in err and "equality constraint" in err
    assert "'random'" not in err and "problem 'branin'" not in err  # only the pair that cannot run
    assert not out.exists()  # refused before the first run, not after random's


def test_bench_writes_what_finished_and_exits_1_when_a_run_fails_later(tmp_path, monkeypatch, capsys):
    from planners.baselines import RandomPlanner

    ask = RandomPlanner.ask

    def ask_failing_on_seed_1(self, n, history, pending, state=None):
        if self.seed == 1 and len(history) >= 4:
            raise RuntimeError("the instrument's driver crashed")
        return ask(self, n, history, pending, state)

    monkeypatch.setattr(RandomPlanner, "ask", ask_failing_on_seed_1)
    out = tmp_path / "bench.json"
    code = main(["bench", "--problems", "branin", "--planners", "random,sobol", "--seeds", "2",
                 "--budget", "6", "--initial", "3", "--out", str(out), "--quiet"])

    assert code == 1
    result = json.loads(out.read_text())["branin"]
    assert result["random"]["failure"] == {"seed": 1, "error": "RuntimeError: the instrument's driver crashed",
                                           "seeds_finished": 1}
    assert len(result["random"]["best_so_far"]) == 1  # seed 0, which finished, is scored
    assert len(result["sobol"]["best_so_far"]) == 2 and "failure" not in result["sobol"]  # the others ran
    assert "driver crashed" in (tmp_path / "bench.md").read_text()
    assert "planner 'random' on problem 'branin', seed 1" in capsys.readouterr().err


def test_bench_counts_the_proposals_ax_made_with_its_sobol_fallback(tmp_path, monkeypatch):
    """Force one fallback: Ax's model node raises the error that makes Ax switch to Sobol
    (GenerationStrategyRepeatedPoints, what it raises when its model keeps repeating points)."""
    from ax.exceptions.generation_strategy import GenerationStrategyRepeatedPoints
    from ax.generation_strategy.generation_node import GenerationNode

    gen = GenerationNode._gen_maybe_deduplicate
    forced = []

    def repeat_once(self, *args, **kwargs):
        if self.name == "MBM" and not forced:
            forced.append(True)
            raise GenerationStrategyRepeatedPoints("the model proposed only points already tried")
        return gen(self, *args, **kwargs)

    monkeypatch.setattr(GenerationNode, "_gen_maybe_deduplicate", repeat_once)
    out = tmp_path / "bench.json"
    assert main(["bench", "--problems", "branin", "--planners", "ax,random", "--seeds", "1", "--budget", "7",
                 "--initial", "5", "--out", str(out), "--quiet"]) == 0

    result = json.loads(out.read_text())["branin"]
    assert forced
    assert result["ax"]["fallback_proposals"] == {"fraction": 0.5, "per_seed": [1], "proposals": 2}
    assert result["random"]["fallback_proposals"]["fraction"] == 0.0
    assert "| 50 % of 2 |" in (tmp_path / "bench.md").read_text()


def test_top1_acceleration_factor_is_randoms_expected_trials_over_the_median_trials_to_a_top_row(tmp_path):
    from orchestrator.bench import score, top1_acceleration_from_traces

    # 19 rows, values 0..18: the top 1 % is ceil(0.19) = 1 row (y = 18); random needs (19+1)/(1+1) = 10 trials
    rows = [{"a": i / 18, "y": float(i)} for i in range(19)]
    bp = parse_problem(_write_table(tmp_path / "ladder", rows, ["a"]))

    def run(values):
        params = [{"a": v / 18} for v in values]
        return {"history": [HistoryItem(p, "completed", {"y": float(v)}) for p, v in zip(params, values, strict=True)],
                "truths": [{"y": float(v)} for v in values], "seconds": [0.0], "fallbacks": 0, "proposed": 3,
                "shared_design": True}

    runs = [run([3, 18, 5, 6]), run([1, 2, 7, 18]), run([0, 4, 9, 10])]  # first top row at 2, 4, never
    t1 = score(bp, runs)["top1_acceleration_factor"]

    assert t1["top_rows"] == 1 and t1["rows"] == 19
    assert t1["random_expected_trials"] == pytest.approx(10.0)
    assert t1["trials_to_first"] == [2, 4, None]
    assert t1["median_trials"] == 4 and t1["factor"] == pytest.approx(10 / 4)
    never = score(bp, [runs[0], runs[2], runs[2]])["top1_acceleration_factor"]
    assert never["median_trials"] is None and never["factor"] is None  # the median seed never found one
    # the same from the best-so-far traces a committed JSON holds
    assert top1_acceleration_from_traces(bp, score(bp, runs)["best_so_far"]) == t1


def test_ax_native_keeps_one_client_and_makes_its_own_initial_design(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--problems", "branin", "--planners", "ax-native,sobol", "--seeds", "1",
                 "--budget", "3", "--initial", "2", "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())["branin"]
    native = result["ax-native"]
    assert native["shared_initial_design"] is False and result["sobol"]["shared_initial_design"] is True
    assert native["proposal_seconds"]["calls"] == 3  # all 3 trials are Ax's: no shared design
    assert native["best_so_far"][0][0] != result["sobol"]["best_so_far"][0][0]
    assert "ax-native (own initial design)" in (tmp_path / "bench.md").read_text()

    from orchestrator.bench import make_bench_planner

    bp = parse_problem("branin")
    planner = make_bench_planner("ax-native", bp.problem, 0, {})
    history: list[HistoryItem] = []
    for _ in range(3):
        (p,) = planner.ask(1, history, [])
        history.append(HistoryItem(p.parameters, "completed", bp.sim.evaluate(p.parameters)))
    assert history[0].parameters == {"x1": 2.5, "x2": 7.5}  # Ax's first trial: the centre of the space
    trials = planner._client_._experiment.trials  # one Client, told each result once: 3 trials, not 1 + 2 + 3
    assert len(trials) == 3 and sum(t.status.is_completed for t in trials.values()) == 2
