"""``labpilot report DIR``: one self-contained HTML file (plotly, its JavaScript inlined, so it
opens offline and can be mailed) and PNGs drawn with matplotlib beside it. The numbers come from
:func:`orchestrator.console.figures.figure_data`, as the console's page draws them."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.console.figures import best_of, figure_data
from orchestrator.ledger import Ledger


def plotly_figures(data: dict[str, Any]) -> dict[str, Any]:
    """The page's plots as plotly figures: best, objective, parameters, pareto (2+ objectives), calibration."""
    import plotly.graph_objects as go

    o0 = data["objectives"][0]["name"]
    figs: dict[str, Any] = {}
    figs["best"] = go.Figure(go.Scatter(x=data["trials"], y=data["best_so_far"], mode="lines+markers",
                                        line={"shape": "hv"}, name=f"best {o0}"),
                             layout={"title": {"text": "Best so far"}, "xaxis": {"title": {"text": "trial"}},
                                     "yaxis": {"title": {"text": o0}}})
    figs["objective"] = go.Figure([go.Scatter(x=data["trials"], y=data["values"][o["name"]], mode="markers",
                                              name=o["name"]) for o in data["objectives"]],
                                  layout={"title": {"text": "Objective per trial"},
                                          "xaxis": {"title": {"text": "trial"}}})
    states = {"completed": 0, "failed": 2, "vetoed": 3, "rejected": 3, "abandoned": 2}
    dims = [{"label": p, "values": [v if isinstance(v, int | float) else None for v in data["param_values"][p]]}
            for p in data["parameters"]]
    figs["parameters"] = go.Figure(go.Parcoords(
        line={"color": [states.get(s, 1) for s in data["param_states"]], "cmin": 0, "cmax": 3,
              "colorscale": [[0, "#137a3a"], [0.33, "#2463eb"], [0.66, "#b42318"], [1, "#999999"]]},
        dimensions=dims), layout={"title": {"text": "Parameters of every trial (green: completed, red: failed)"}})
    if len(data["objectives"]) >= 2:
        a, b = data["objectives"][0]["name"], data["objectives"][1]["name"]
        on = set(data["pareto"])
        front = sorted((i for i, n in enumerate(data["trials"]) if n in on), key=lambda i: data["values"][a][i])
        figs["pareto"] = go.Figure([
            go.Scatter(x=data["values"][a], y=data["values"][b], mode="markers", name="trials",
                       text=[f"trial {n}" for n in data["trials"]]),
            go.Scatter(x=[data["values"][a][i] for i in front], y=[data["values"][b][i] for i in front],
                       mode="lines+markers", name="Pareto front")],
            layout={"title": {"text": "Pareto front"}, "xaxis": {"title": {"text": a}}, "yaxis": {"title": {"text": b}}})
    figs["calibration"] = go.Figure([go.Scatter(x=data["model_numbers"], y=ys, mode="lines+markers", name=k)
                                     for k, ys in data["calibration"].items()],
                                    layout={"title": {"text": "Calibration over model versions"},
                                            "xaxis": {"title": {"text": "model version"}}})
    return figs


def write_pngs(data: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """The same plots as PNGs (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    o0 = data["objectives"][0]["name"]

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{stem}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.step(data["trials"], [float("nan") if v is None else v for v in data["best_so_far"]], where="post", marker="o")
    ax.set(xlabel="trial", ylabel=o0, title="Best so far")
    save(fig, "best")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for o in data["objectives"]:
        ax.plot(data["trials"], [float("nan") if v is None else v for v in data["values"][o["name"]]], "o", label=o["name"])
    ax.set(xlabel="trial", title="Objective per trial")
    ax.legend()
    save(fig, "objective")
    params = data["parameters"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    cols = {"completed": "tab:green", "failed": "tab:red", "vetoed": "tab:gray", "rejected": "tab:gray"}
    for i, state in enumerate(data["param_states"]):
        ys = []
        for p in params:
            vals = [v for v in data["param_values"][p] if isinstance(v, int | float)]
            v = data["param_values"][p][i]
            lo, hi = (min(vals), max(vals)) if vals else (0, 1)
            ys.append((v - lo) / (hi - lo) if isinstance(v, int | float) and hi > lo else 0.5)
        ax.plot(range(len(params)), ys, color=cols.get(state, "tab:blue"), alpha=0.6)
    ax.set_xticks(range(len(params)), params)
    ax.set(ylabel="scaled to the values tried", title="Parameters of every trial")
    save(fig, "parameters")
    if len(data["objectives"]) >= 2:
        a, b = data["objectives"][0]["name"], data["objectives"][1]["name"]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(data["values"][a], data["values"][b], "o", alpha=0.5, label="trials")
        on = set(data["pareto"])
        front = sorted((data["values"][a][i], data["values"][b][i]) for i, n in enumerate(data["trials"]) if n in on)
        if front:
            ax.plot(*zip(*front, strict=True), "o-", color="tab:red", label="Pareto front")
        ax.set(xlabel=a, ylabel=b, title="Pareto front")
        ax.legend()
        save(fig, "pareto")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, ys in data["calibration"].items():
        ax.plot(data["model_numbers"], [float("nan") if v is None else v for v in ys], "o-", label=k)
    ax.set(xlabel="model version", title="Calibration over model versions")
    ax.legend()
    save(fig, "calibration")
    return written


def write_report(ledger: Ledger, campaign_id: int, out: str | Path) -> dict[str, Any]:
    """Write the HTML report to ``out`` and its PNGs beside it; returns ``{"html", "pngs"}``."""
    from orchestrator.spec import CampaignSpec

    out = Path(out)
    row = ledger.campaign(campaign_id)
    spec = CampaignSpec.model_validate(row.spec)
    data = figure_data(ledger, campaign_id, spec)
    figs = plotly_figures(data)
    counts = ledger.counts(campaign_id)
    best = best_of(data) if len(spec.objectives) == 1 else None
    parts = []
    for i, (name, fig) in enumerate(figs.items()):
        fig.update_layout(height=380, margin={"l": 60, "r": 20, "t": 50, "b": 50})
        parts.append(f'<section id="plot-{name}">' + fig.to_html(full_html=False, include_plotlyjs=i == 0,
                                                                  div_id=f"fig-{name}") + "</section>")
    e = html.escape
    summary = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    best_line = (f"<p>Best {e(best['objective'])} = {best['value']:.6g} (trial {best['trial']})</p>" if best
                 else f"<p>{len(data['pareto'])} trials on the Pareto front</p>" if data["pareto"] else "")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>labpilot report: {e(row.name)}</title>
<style>body{{font:14px system-ui,sans-serif;max-width:1100px;margin:1em auto;color:#1c2430}}
section{{margin:1em 0}} table{{border-collapse:collapse}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style>
</head><body>
<h1>{e(row.name)}</h1>
<p>{e(spec.description)}</p>
<p>Status {e(row.status)}{' (' + e(row.stop_reason) + ')' if row.stop_reason else ''}; trials: {e(summary) or 'none'}.
Report written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.</p>
{best_line}
{''.join(parts)}
</body></html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    pngs = write_pngs(data, out.parent, out.stem)
    return {"html": out, "pngs": pngs}
