"""Check the planner benchmark's figures against issue 3's targets; prints Markdown.

Usage: .venv/bin/python benchmarks/summarize.py benchmarks/planners
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.bench import parse_problem, top1_acceleration_from_traces  # noqa: E402

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def top1(label: str, m: dict) -> dict | None:
    """A pool row's Top-1 % acceleration factor: from the JSON, or (JSON written before the bench
    computed it) from its best-so-far traces and the table in ../shared/datasets."""
    if "top1_acceleration_factor" in m:
        return m["top1_acceleration_factor"]
    if not (DATASETS / label).is_dir():
        return None
    return top1_acceleration_from_traces(parse_problem(str(DATASETS / label)), m["best_so_far"])


def top1_text(label: str, m: dict) -> str:
    t = top1(label, m)
    if t is None:
        return ""
    if t["factor"] is None:
        return f"; Top-1 % AF not reached (a top-1 % row in {t['found_in_seeds']} of {len(t['trials_to_first'])} seeds)"
    return (f"; Top-1 % AF {t['factor']:.3g} (median {t['median_trials']:.3g} trials to a top-1 % row, random "
            f"{t['random_expected_trials']:.3g})")


def load(folder: Path, name: str) -> dict | None:
    p = folder / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def fmt(x, nd=4):
    return "-" if x is None else f"{x:.{nd}g}"


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/planners")
    rows = []

    def row(target, measured, met):
        verdict = {True: "met", False: "NOT met", None: "not run"}.get(met, met)
        rows.append(f"| {target} | {measured} | {verdict} |")

    def variants(res: dict, label: str) -> None:
        """bo's other configurations in the same run, for information."""
        for name, what in (("bo-cold", "GP fitted from scratch on every ask"),
                           ("bo-trainer", "on the surrogate trainer's versions, as in a campaign")):
            if name in res:
                m = res[name]
                row(f"{label}: {name} ({what})", f"regret {fmt(m['simple_regret']['median'])}, "
                    f"{fmt(m['proposal_seconds']['median'], 3)} s per proposal", "information")

    h6 = load(folder, "hartmann6")
    if h6:
        bo, ax = h6["hartmann6"]["bo"], h6["hartmann6"].get("ax")
        r_bo = bo["simple_regret"]["median"]
        r_ax = ax["simple_regret"]["median"] if ax else None
        row("Hartmann6, 35 trials: bo regret <= 0.10", fmt(r_bo), r_bo <= 0.10)
        row("Hartmann6: bo no worse than Ax (median regret)", f"bo {fmt(r_bo)} vs ax {fmt(r_ax)}",
            None if r_ax is None else r_bo <= r_ax)
        if ax:
            t_bo, t_ax = bo["proposal_seconds"]["median"], ax["proposal_seconds"]["median"]
            row("Hartmann6 whole run (5-34 observations, lanes sharing the machine): proposal time",
                f"bo {fmt(t_bo, 3)} s, ax {fmt(t_ax, 3)} s, {t_ax / t_bo:.1f}x",
                "information (the timing target is read from the timing runs)")
        variants(h6["hartmann6"], "Hartmann6")
    else:
        row("Hartmann6 targets", "-", None)
    hn = load(folder, "hartmann6_ax_native")  # laneE: bo, ax (paired design) and ax-native in one run
    if hn:
        res = hn["hartmann6"]
        r_bo = res["bo"]["simple_regret"]["median"]
        for name, what in (("ax", "Ax fed the paired 5-point design, a fresh Client per ask"),
                           ("ax-native", "Ax's own Client for the whole run, its own initial design")):
            m = res.get(name)
            if m is None or "simple_regret" not in m:
                row(f"Hartmann6 (laneE): bo no worse than {name}", "-", None)
                continue
            r = m["simple_regret"]["median"]
            n = len(m["simple_regret"]["per_seed"])
            wins = sum(a <= b for a, b in zip(res["bo"]["simple_regret"]["per_seed"], m["simple_regret"]["per_seed"],
                                              strict=True))
            row(f"Hartmann6, 35 trials, {n} seeds (laneE): bo no worse than {name} ({what}; median regret)",
                f"bo {fmt(r_bo)} vs {name} {fmt(r)}; bo as good or better on {wins}/{n} seeds; "
                f"{name} fallback proposals {100 * m['fallback_proposals']['fraction']:.0f} %", r_bo <= r)
    else:
        row("Hartmann6 (laneE): bo no worse than ax and ax-native", "-", None)
    ref = {f: load(folder, f"ax_standalone_hartmann6{s}") for f, s in (("numpy", ""), ("botorch", "_botorch"))}
    if all(ref.values()):  # the `reference` runs: Ax's Client with no labpilot code
        med = {f: r["simple_regret"]["median"] for f, r in ref.items()}
        native = (hn or {}).get("hartmann6", {}).get("ax-native", {}).get("simple_regret", {}).get("per_seed", [])
        same = len(native) == len(ref["botorch"]["simple_regret"]["per_seed"]) and all(
            abs(a - b) < 1e-6 for a, b in zip(native, ref["botorch"]["simple_regret"]["per_seed"], strict=True))
        row("Hartmann6: Ax's Client standalone (ax_standalone.py, no labpilot code, seeds 0-4)",
            f"on BoTorch's Hartmann6 (the bench's) {fmt(med['botorch'])}, "
            f"{'the same as ax-native on every seed' if same else 'NOT the same as ax-native per seed'}; "
            f"on Hartmann6 in numpy (outcomes ~1e-8 apart) {fmt(med['numpy'])}",
            "information: 5 seeds do not resolve Ax's median; bo vs Ax as such is undetermined")
    br = load(folder, "branin")
    if br:
        r = br["branin"]["bo"]["simple_regret"]["median"]
        row("Branin, 30 trials: bo regret <= 0.01", fmt(r), r <= 0.01)
        variants(br["branin"], "Branin")
    else:
        row("Branin, 30 trials: bo regret <= 0.01", "-", None)
    for name in ("campaign_path_branin", "campaign_path_hartmann6"):
        cp = load(folder, name)  # bo on the trainer's versions, on later code than lane A's rows
        for prob, res in (cp or {}).items():
            m = res["bo-trainer"]
            row(f"{prob}: the campaign path (bo on the trainer's versions, {name}.json)",
                f"regret {fmt(m['simple_regret']['median'])}, {fmt(m['proposal_seconds']['median'], 3)} s per proposal",
                "information")
    for name, prob in (("rl_branin", "branin"), ("rl_hartmann6", "hartmann6")):
        rl, base = load(folder, name), load(folder, prob)
        if not (rl and base):
            row(f"{prob}: rl beats random and Sobol", "-", None)
            continue
        r_rl = rl[prob]["rl"]["simple_regret"]["median"]
        optimum = next(iter(parse_problem(prob).sim.optimum.values()))
        regrets = {k: [abs(t[-1] - optimum) for t in v["best_so_far"]] for k, v in base[prob].items()
                   if k in ("random", "sobol", "bo")}
        mine = [abs(t[-1] - optimum) for t in rl[prob]["rl"]["best_so_far"]]
        n = len(mine)  # rl ran on the first n of the paired seeds
        wins = {k: sum(a < b for a, b in zip(mine, regrets[k][:n], strict=True)) for k in ("random", "sobol")}
        row(f"{prob}: rl beats random and Sobol (median regret on the same {n} paired seeds)",
            f"rl {fmt(r_rl)}; " + ", ".join(f"{k} {fmt(statistics.median(v[:n]))}" for k, v in regrets.items())
            + f"; rl better on {wins['random']}/{n} seeds than random, {wins['sobol']}/{n} than Sobol",
            all(r_rl < statistics.median(regrets[k][:n]) for k in ("random", "sobol")))
    bc = load(folder, "branincurrin_noisy")
    if bc:
        hv = bc["branincurrin-noisy"]["bo"]["hypervolume"]["median"]
        row("BraninCurrin noisy, 6 + 20x4: hypervolume >= 57.8", fmt(hv), hv >= 57.8)
    else:
        row("BraninCurrin noisy, 6 + 20x4: hypervolume >= 57.8", "-", None)
    for name, label, limit in (("time_q1", "one proposal at 30-34 observations", 0.3),
                               ("time_q4", "a batch of 4 at 23-35 observations", 1.0),
                               ("time_lincon", "one proposal with a linear constraint", 1.0)):
        t = load(folder, name)
        if not t:
            row(f"{label}: median <= {limit} s and >= 3x faster than Ax", "-", None)
            continue
        (prob, res), = t.items()
        tb, ta = res["bo"]["proposal_seconds"]["median"], res["ax"]["proposal_seconds"]["median"]
        rb, ra = res["bo"].get("simple_regret", {}).get("median"), res["ax"].get("simple_regret", {}).get("median")
        row(f"{label}: median <= {limit} s", f"bo {fmt(tb, 3)} s (p90 {fmt(res['bo']['proposal_seconds']['p90'], 3)})",
            tb <= limit)
        row(f"{label}: >= 3x faster than Ax at equal or better regret",
            f"ax {fmt(ta, 3)} s = {ta / tb:.1f}x; regret bo {fmt(rb)} vs ax {fmt(ra)}", ta / tb >= 3 and rb <= ra)
    cb = load(folder, "crossed_barrel")
    if cb:
        m = cb["crossed_barrel"]["bo"]
        af, ef = m["acceleration_factor"].get("0.5"), m["enhancement_factor"].get("at_50")
        row("crossed_barrel pool: AF >= 3.6 at Top% 0.5", fmt(af), None if af is None else af >= 3.6)
        row("crossed_barrel pool: EF >= 3.9 at 50 trials", fmt(ef), None if ef is None else ef >= 3.9)
        row("crossed_barrel pool: Top-1 % acceleration factor (Rohr et al. 2020)",
            top1_text("crossed_barrel", m).removeprefix("; ") or "-", "information")
    else:
        row("crossed_barrel pool: AF >= 3.6 at Top% 0.5, EF >= 3.9 at 50", "-", None)
    fb = load(folder, "buchwald_a_ax")  # laneF: what the ax row is on a categorical table
    for prob, res in (fb or {}).items():
        parts = []
        for name, m in res.items():
            f = m["fallback_proposals"]
            parts.append(f"{name}: regret {fmt(m['simple_regret']['median'])}, {100 * f['fraction']:.0f} % of "
                         f"{f['proposals']} proposals were fallbacks")
        row(f"{prob} (laneF, categorical): the ax row's Sobol fallbacks", "; ".join(parts), "information")
    ds = load(folder, "datasets")
    if ds:
        for prob, res in ds.items():
            afs = {k: round(v, 2) for k, v in res["bo"]["acceleration_factor"].items() if v is not None}
            best = max(afs.values()) if afs else None
            ef = res["bo"]["enhancement_factor"].get("at_50")
            top1 = top1_text(prob, res["bo"])
            if best is None:
                row(f"{prob}: acceleration factor > 1", f"no Top% level reached in the budget (EF at 50: "
                    f"{fmt(ef)}{top1})", "undetermined at this budget")
            else:
                row(f"{prob}: acceleration factor > 1", f"AF by Top% level {afs}; EF at 50: {fmt(ef)}{top1}",
                    best > 1)
    else:
        row("every shared dataset: acceleration factor > 1", "-", None)
    bf = load(folder, "branin_failing")
    if bf:
        m = bf["branin_failing"]
        f_bo, f_plain = m["bo"]["failed_trials"]["median"], m["bo-plain"]["failed_trials"]["median"]
        v_bo, v_plain = m["bo"]["simple_regret"]["median"], m["bo-plain"]["simple_regret"]["median"]
        row("failing region: at most half the failed trials of bo without the feasibility model, no worse value",
            f"failed {fmt(f_bo)} vs {fmt(f_plain)}; regret {fmt(v_bo)} vs {fmt(v_plain)}",
            f_bo <= 0.5 * f_plain and v_bo <= v_plain)
    else:
        row("failing region: half the failures, no worse value", "-", None)
    print("| target | measured (medians) | verdict |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
