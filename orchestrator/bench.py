"""``labpilot bench``: planners side by side on the same problems, seeds and initial designs.

Every planner runs on every problem with paired seeds: for seed ``s`` all
planners start from the same initial design (scrambled Sobol points, or
random rows of a pool), then each asks for ``batch`` trials at a time until
the budget is spent. Outcomes of noisy problems are observed with noise;
traces and regrets are scored on the noise-free values of the evaluated
points (the convention of BoTorch's studies). Pools are scored as in Liang et
al., npj Comput. Mater. 7, 188 (2021): Top% (fraction of the best 5 % of rows
found), and enhancement and acceleration factors against random picks, whose
expected Top% after N picks is N / rows; and as in Rohr et al., Chem. Sci. 11,
2696 (2020): the Top-1 % acceleration factor, random's expected number of
trials to the first of the K best 1 % of N rows, (N + 1) / (K + 1) (drawing
without replacement), over the trials the planner took to find one.

A planner whose class says ``shared_design = False`` (``ax-native``: Ax run as
its documentation runs it) gets no shared initial design and makes its own.
A proposal whose ``model_version`` names a fallback generator (Ax's
``Fallback_Sobol``, when its model repeated points) is counted, and each row
reports the share of its proposals that were fallbacks.

Before the first run every planner is built on every problem (:func:`check`),
so a planner that cannot handle a problem is refused up front; a run that
fails later is recorded under its planner (``failure``) beside what finished.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.report import best_so_far
from planners import PLANNERS, Planner, make_planner
from planners.base import HistoryItem, Problem, Proposal
from planners.baselines import sobol_points
from planners.space import LinearConstraint, SearchSpace
from simulators.problems import ANALYTIC, SimProblem, load_table, pool_rows

# Noise of the noisy variants: BoTorch's multi-objective tutorial uses these for BraninCurrin.
NOISY = {"branincurrin": [15.19, 0.63], "branin": [1.0], "hartmann6": [0.05]}
TOP_LEVELS = (0.25, 0.5, 0.75, 1.0)
#: Planners only the benchmark runs: references, not campaign planners (they keep state between asks).
BENCH_PLANNERS = {"ax-native": "planners.ax_adapter:AxNativePlanner"}


def planner_names() -> list[str]:
    """Every planner the benchmark can run."""
    return sorted({*PLANNERS, *BENCH_PLANNERS})


def make_bench_planner(name: str, problem: Problem, seed: int, options: dict[str, Any]) -> Planner:
    """A planner of :data:`planners.PLANNERS` or :data:`BENCH_PLANNERS`; bad options raise ``ValueError``."""
    if name not in BENCH_PLANNERS:
        return make_planner(name, problem, seed=seed, options=options)
    import importlib

    module, cls = BENCH_PLANNERS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)(problem, seed=seed, **options)
    except TypeError as exc:
        raise ValueError(f"planner {name!r}: bad option ({exc}); see its docstring for options") from exc


def is_fallback(proposal: Proposal) -> bool:
    """Whether the proposal came from a planner's fallback generator (its ``model_version`` says so)."""
    return "/fallback" in (proposal.model_version or "").lower()


@dataclass
class BenchProblem:
    """A problem as the benchmark sees it: what to optimise and how to score it."""

    label: str
    sim: SimProblem
    problem: Problem
    noise: list[float]

    @property
    def is_pool(self) -> bool:
        return self.problem.pool is not None


# Variants with one linear constraint that keeps the known optimum feasible.
CONSTRAINED = {"hartmann6": "x1 + x2 <= 0.5", "branin": "x1 + x2 <= 10"}


def parse_problem(text: str) -> BenchProblem:
    """``branin``, ``hartmann6``, ``branincurrin``, ``branin_failing``, ``NAME-noisy`` (or
    ``NAME:noise=0.1``), ``NAME-constrained`` (one linear constraint, optimum still feasible),
    or the path of a dataset folder (``data.csv`` + ``dataset.yaml``)."""
    name, _, opts = text.partition(":")
    noise: list[float] = []
    base = name
    constraint = None
    if name.endswith("-constrained") and name.removesuffix("-constrained") in CONSTRAINED:
        base = name.removesuffix("-constrained")
        constraint = CONSTRAINED[base]
    if name.endswith("-noisy"):
        base = name.removesuffix("-noisy")
        noise = NOISY.get(base, [0.1])
    if opts.startswith("noise="):
        noise = [float(v) for v in opts.removeprefix("noise=").split("/")]
    if base in ANALYTIC:
        sim = ANALYTIC[base]()
    elif Path(base).is_dir():
        sim = load_table(base)
    else:
        raise ValueError(f"unknown problem {text!r}; use one of {sorted(ANALYTIC)} (optionally with "
                         "'-noisy' or ':noise=SD'), or the path of a dataset folder")
    if constraint is not None:
        sim.constraints = [*sim.constraints, LinearConstraint.parse(constraint)]
    space = SearchSpace(parameters=sim.parameters, constraints=sim.constraints)
    problem = Problem(space=space, objectives=list(sim.objectives), pool=pool_rows(sim))
    if noise and len(noise) == 1:
        noise = noise * len(sim.outcomes)
    label = Path(base).name if Path(base).is_dir() else name
    if opts:
        label = f"{label}:{opts}"
    return BenchProblem(label, sim, problem, noise)


def _observe(bp: BenchProblem, point: dict[str, Any], rng: np.random.Generator) -> tuple[HistoryItem, dict]:
    """Run one simulated experiment: (what the planner sees, the noise-free truth or {} if failed)."""
    sim = bp.sim
    if sim.fails is not None and sim.fails(point):
        return HistoryItem(point, "failed"), {}
    truth = sim.evaluate(point)
    seen = dict(truth)
    for i, o in enumerate(sim.outcomes):
        if bp.noise:
            seen[o] = truth[o] + bp.noise[i] * float(rng.normal())
    return HistoryItem(point, "completed", seen), truth


def initial_design(bp: BenchProblem, n: int, seed: int) -> list[dict[str, Any]]:
    """The paired initial design of seed ``seed``: Sobol points, or distinct random pool rows."""
    if bp.is_pool:
        rows = np.random.default_rng(10_000 + seed).choice(len(bp.problem.pool), size=n, replace=False)
        return [dict(bp.problem.pool[int(i)]) for i in rows]
    return bp.problem.space.decode(sobol_points(bp.problem.space, n, seed=10_000 + seed))


def run_one(bp: BenchProblem, planner_name: str, seed: int, budget: int, batch: int, initial: int,
            options: dict[str, Any]) -> dict[str, Any]:
    """One planner on one problem with one seed; returns the raw record of the run."""
    rng = np.random.default_rng(seed)
    options = dict(options)
    # "surrogate_trainer": true runs the planner on a surrogate trainer's model versions, as a
    # campaign does, trained (synchronously, so the run is reproducible) after every result
    use_trainer = bool(options.pop("surrogate_trainer", False))
    planner = make_bench_planner(planner_name, bp.problem, seed, options)
    trainer, tmp = None, None
    if use_trainer:
        import tempfile

        from planners.surrogates import SurrogateTrainer

        tmp = tempfile.TemporaryDirectory(prefix="labpilot-bench-")
        trainer = SurrogateTrainer(bp.problem, tmp.name)
        planner.surrogate_source = trainer
    history: list[HistoryItem] = []
    truths: list[dict] = []

    def observe(point: dict[str, Any]) -> None:
        h, t = _observe(bp, point, rng)
        history.append(h)
        truths.append(t)
        if trainer is not None and h.state == "completed":
            trainer.add_result(len(history), h.parameters, h.outcomes)

    seconds = []
    state = None  # what the planner carries from one ask to the next, as a campaign's ledger does
    fallbacks = 0
    shared = getattr(planner, "shared_design", True)
    try:
        for point in initial_design(bp, initial, seed) if shared else []:
            observe(point)
        while len(history) < budget:
            q = min(batch, budget - len(history))
            if trainer is not None:
                trainer.update()
            t0 = time.perf_counter()
            proposals = planner.ask(q, history, [], state=state)
            seconds.append(time.perf_counter() - t0)
            state = next((p.model_state for p in proposals if p.model_state is not None), state)
            fallbacks += sum(is_fallback(p) for p in proposals)
            for p in proposals:
                observe(p.parameters)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"history": history, "truths": truths, "seconds": seconds, "fallbacks": fallbacks,
            "proposed": len(history) - (initial if shared else 0), "shared_design": shared}


def _quantiles(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"median": None, "iqr": [None, None], "per_seed": values}
    q = np.percentile(finite, [25, 50, 75])
    return {"median": float(q[1]), "iqr": [float(q[0]), float(q[2])], "per_seed": values}


def score(bp: BenchProblem, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of one planner's runs (one per seed) on one problem."""
    sim = bp.sim
    objectives = sim.objectives
    out: dict[str, Any] = {}
    truth_items = [
        [HistoryItem(h.parameters, "completed", t) if t else HistoryItem(h.parameters, "failed")
         for h, t in zip(r["history"], r["truths"], strict=True)]
        for r in runs
    ]
    out["failed_trials"] = _quantiles([float(sum(1 for h in r["history"] if h.state == "failed")) for r in runs])
    secs = [s for r in runs for s in r["seconds"]]
    out["proposal_seconds"] = {"median": statistics.median(secs) if secs else None,
                               "p90": float(np.percentile(secs, 90)) if secs else None, "calls": len(secs)}
    out["shared_initial_design"] = all(r["shared_design"] for r in runs)
    proposed = sum(r["proposed"] for r in runs)
    out["fallback_proposals"] = {  # proposals made by a fallback generator, not the planner's model
        "fraction": sum(r["fallbacks"] for r in runs) / proposed if proposed else 0.0,
        "per_seed": [r["fallbacks"] for r in runs], "proposals": proposed}
    if len(objectives) == 1:
        o = objectives[0]
        traces = []
        for items in truth_items:
            best, trace = -math.inf, []
            for h in items:
                if h.state == "completed":
                    best = max(best, float(o.utility(h.outcomes[o.name])))
                trace.append(None if best == -math.inf else float(o.utility(best)))  # back to raw units
            traces.append(trace)
        out["best_so_far"] = traces
        out["best_value"] = _quantiles([t[-1] for t in traces])
        if o.name in sim.optimum:
            out["simple_regret"] = _quantiles([abs(t[-1] - sim.optimum[o.name]) if t[-1] is not None else None
                                               for t in traces])
    else:
        ref = [sim.optimum.get(f"ref_{o.name}") for o in objectives]
        ref = None if any(r is None for r in ref) else ref
        hv_traces = []
        for items in truth_items:
            trace = []
            for k in range(1, len(items) + 1):
                b = best_so_far(items[:k], objectives, [], ref)
                trace.append(b.hypervolume if b.hypervolume is not None else 0.0)
            hv_traces.append(trace)
        out["hypervolume_trace"] = hv_traces
        out["hypervolume"] = _quantiles([t[-1] for t in hv_traces])
        if "hypervolume" in sim.optimum:
            out["hypervolume"]["max_possible"] = sim.optimum["hypervolume"]
    if bp.is_pool:
        out.update(_pool_metrics(bp, runs))
    return out


def _pool_metrics(bp: BenchProblem, runs: list[dict[str, Any]]) -> dict[str, Any]:
    o = bp.sim.objectives[0]
    table = bp.sim.table
    assert table is not None
    rows = len(table)
    utilities = np.array([float(o.utility(v)) for v in table[o.name].to_numpy(float)])
    n_top = max(1, int(math.ceil(0.05 * rows)))
    threshold = np.sort(utilities)[::-1][n_top - 1]
    top_traces = []
    for r in runs:
        found, trace = set(), []
        for t, h in zip(r["truths"], r["history"], strict=True):
            if t and float(o.utility(t[o.name])) >= threshold:
                found.add(tuple(sorted((k, str(v)) for k, v in h.parameters.items())))
            trace.append(min(1.0, len(found) / n_top))
        top_traces.append(trace)
    budget = len(top_traces[0])
    mean_trace = np.mean(np.array(top_traces), axis=0)
    random_trace = np.arange(1, budget + 1) / rows  # expected Top% of random picks after N
    ef = mean_trace / random_trace
    af = {}
    for level in TOP_LEVELS:
        reached = np.nonzero(mean_trace >= level - 1e-12)[0]
        af[str(level)] = float(level * rows / (reached[0] + 1)) if len(reached) else None
    return {
        "top_percent": {"per_seed": top_traces, "mean_trace": mean_trace.tolist(),
                        "final": _quantiles([t[-1] for t in top_traces]), "top_rows": n_top, "rows": rows},
        "enhancement_factor": {"trace": ef.tolist(), "at_budget": float(ef[-1]),
                               **{f"at_{n}": float(ef[n - 1]) for n in (25, 50, 100) if n <= budget}},
        "acceleration_factor": af,
        "top1_acceleration_factor": _top1_acceleration(o, utilities, runs),
    }


def _top1_acceleration(o: Any, utilities: np.ndarray, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rohr et al. (2020)'s Top-1 % acceleration factor: random's expected trials to the first
    top-1 % row, (N + 1) / (K + 1), over the median trials the planner took (initial design
    included; a seed that found none within the budget counts as never)."""
    threshold = _top1_threshold(utilities)
    firsts = [next((i + 1 for i, t in enumerate(r["truths"]) if t and float(o.utility(t[o.name])) >= threshold),
                   None) for r in runs]
    return _top1_summary(utilities, threshold, firsts)


def _top1_threshold(utilities: np.ndarray) -> float:
    return float(np.sort(utilities)[::-1][max(1, int(math.ceil(0.01 * len(utilities)))) - 1])


def _top1_summary(utilities: np.ndarray, threshold: float, firsts: list[int | None]) -> dict[str, Any]:
    rows = len(utilities)
    k = int((utilities >= threshold).sum())  # ties at the threshold are top rows too
    expected = (rows + 1) / (k + 1)
    median = float(np.median([math.inf if f is None else f for f in firsts]))
    return {"top_rows": k, "rows": rows, "random_expected_trials": expected, "trials_to_first": firsts,
            "median_trials": None if math.isinf(median) else median,
            "factor": None if math.isinf(median) else expected / median,
            "found_in_seeds": sum(f is not None for f in firsts)}


def top1_acceleration_from_traces(bp: BenchProblem, traces: list[list[float | None]]) -> dict[str, Any]:
    """The Top-1 % acceleration factor of a pool from best-so-far traces (raw units, one per seed),
    as a bench JSON stores them: the best so far first reaches a top-1 % value on the trial that
    found the first top-1 % row. For JSON written before the factor was computed."""
    o = bp.sim.objectives[0]
    assert bp.sim.table is not None, "top1_acceleration_from_traces needs a pool problem"
    utilities = np.array([float(o.utility(v)) for v in bp.sim.table[o.name].to_numpy(float)])
    threshold = _top1_threshold(utilities)
    firsts = [next((i + 1 for i, v in enumerate(t) if v is not None and float(o.utility(v)) >= threshold), None)
              for t in traces]
    return _top1_summary(utilities, threshold, firsts)


def run_bench(problems: list[str], planners: list[str], seeds: int, budget: int, batch: int, initial: int,
              options: dict[str, dict[str, Any]] | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every planner on every problem with ``seeds`` paired seeds; the JSON-ready result.

    ``options`` maps a planner label to its options; an entry with ``"planner": NAME``
    makes the label a second configuration of planner NAME (``bo-plain`` = bo without
    its feasibility model, say)."""
    options = options or {}
    result: dict[str, Any] = {}
    for text in problems:
        bp = parse_problem(text)
        per_planner: dict[str, Any] = {}
        for name in planners:
            real, opts = _configuration(name, options, budget, initial)
            runs, failure = [], None
            for s in range(seeds):
                t0 = time.perf_counter()
                try:
                    runs.append(run_one(bp, real, s, budget, batch, initial, opts))
                except Exception as exc:  # noqa: BLE001 - recorded; the other planners still run
                    failure = {"seed": s, "error": f"{type(exc).__name__}: {exc}", "seeds_finished": len(runs)}
                    if progress:
                        progress(f"{bp.label} {name} seed {s}: FAILED ({failure['error']})")
                    break
                if progress:
                    progress(f"{bp.label} {name} seed {s}: {time.perf_counter() - t0:.1f} s")
            per_planner[name] = score(bp, runs) if runs else {}
            if failure is not None:
                per_planner[name]["failure"] = failure
        result[bp.label] = per_planner
    return result


def _configuration(name: str, options: dict[str, dict[str, Any]], budget: int,
                   initial: int) -> tuple[str, dict[str, Any]]:
    """(planner, options) of the row labelled ``name``."""
    opts = dict(options.get(name, {}))
    real = opts.pop("planner", name)  # a label may name a planner with other options
    if real in ("bo", "rl") and "initial_trials" not in opts:
        opts["initial_trials"] = min(initial, budget)
    return real, opts


def check(problems: list[BenchProblem], planners: list[str], budget: int, initial: int,
          options: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """What stops a (planner, problem) pair from running, one line each; empty when all can run.

    Builds every planner on every problem (seed 0), as its runs will, so a planner that
    refuses a problem (Ax and an equality constraint, say) or a bad option is found before
    hours of other runs, not after; and checks that every pool has rows for the budget."""
    options = options or {}
    problems_found = []
    for bp in problems:
        if bp.is_pool and len(bp.problem.pool) < budget:
            problems_found.append(f"problem {bp.label!r}: the pool has {len(bp.problem.pool)} rows, "
                                  f"fewer than the budget of {budget}; lower --budget")
        for name in planners:
            real, opts = _configuration(name, options, budget, initial)
            opts.pop("surrogate_trainer", None)
            try:
                make_bench_planner(real, bp.problem, 0, opts)
            except Exception as exc:  # noqa: BLE001 - whatever it is, the pair cannot run
                problems_found.append(f"planner {name!r} on problem {bp.label!r}: {exc}")
    return problems_found


def failures(result: dict[str, Any]) -> list[str]:
    """The runs of ``result`` that failed, one line each."""
    return [f"planner {name!r} on problem {problem!r}, seed {m['failure']['seed']}: {m['failure']['error']}"
            for problem, planners in result.items() for name, m in planners.items() if "failure" in m]


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    """A Markdown table per problem: one row per planner."""
    lines = [f"# labpilot bench\n\n`{meta['command']}`\n",
             f"{meta['seeds']} paired seeds, budget {meta['budget']}, batch {meta['batch']}, "
             f"{meta['initial']} initial points; medians with interquartile ranges. Fallback proposals: "
             "the share of a planner's own proposals that a fallback generator made, not its model "
             "(Ax's Sobol fallback when its model repeats points).\n"]
    for problem, planners in result.items():
        lines.append(f"\n## {problem}\n")
        header = ["planner"]
        first = next((m for m in planners.values() if "proposal_seconds" in m), {})
        keys = [k for k in ("simple_regret", "best_value", "hypervolume") if k in first]
        header += [k.replace("_", " ") for k in keys]
        pool = "top_percent" in first
        if pool:
            header += ["Top% at budget", "EF at 50", "AF at Top% 0.5", "Top-1 % AF (median trials)"]
        header += ["failed trials", "fallback proposals", "proposal s (median / p90)"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        failed_runs = []
        for name, m in planners.items():
            if "failure" in m:
                f = m["failure"]
                failed_runs.append(f"- {name}: seed {f['seed']} failed after {f['seeds_finished']} seed(s) "
                                   f"finished: {f['error']}")
            if "proposal_seconds" not in m:
                lines.append("| " + " | ".join([name] + ["failed"] + ["-"] * (len(header) - 2)) + " |")
                continue
            row = [name + ("" if m["shared_initial_design"] else " (own initial design)")
                   + (f" ({m['failure']['seeds_finished']} seeds)" if "failure" in m else "")]
            for k in keys:
                q = m[k]
                row.append("-" if q["median"] is None else f"{q['median']:.4g} [{q['iqr'][0]:.3g}, {q['iqr'][1]:.3g}]")
            if pool:
                row.append(f"{m['top_percent']['final']['median']:.3g}")
                ef = m["enhancement_factor"].get("at_50")
                row.append("-" if ef is None else f"{ef:.3g}")
                af = m["acceleration_factor"].get("0.5")
                row.append("not reached" if af is None else f"{af:.3g}")
                t1 = m["top1_acceleration_factor"]
                row.append("not reached" if t1["factor"] is None else
                           f"{t1['factor']:.3g} ({t1['median_trials']:.3g} vs random "
                           f"{t1['random_expected_trials']:.3g})")
            row.append(f"{m['failed_trials']['median']:.3g}")
            fb = m["fallback_proposals"]
            row.append(f"{100 * fb['fraction']:.0f} % of {fb['proposals']}")
            ps = m["proposal_seconds"]
            row.append("-" if ps["median"] is None else f"{ps['median']:.3f} / {ps['p90']:.3f}")
            lines.append("| " + " | ".join(row) + " |")
        if failed_runs:
            lines.append("\nFailed runs:\n")
            lines.extend(failed_runs)
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], meta: dict[str, Any], out: Path) -> Path:
    """Write ``out`` (JSON) and the Markdown table beside it; return the Markdown path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))  # keyed by problem, then planner
    md = out.with_suffix(".md")
    md.write_text(markdown(result, meta))
    return md

