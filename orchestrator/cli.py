"""The ``labpilot`` command line: run, validate, status, export, bench, trainer, proxy, and the
operator's verbs (orchestrator.control_cli: pause, resume, stop, approve, reject, ...).

Exit codes: 0 done, 2 bad input (the message says what to fix), 1 failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from orchestrator.settings import Settings, configure_prefect_environment

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT: the campaign resumes with the same command

console = Console(highlight=False)
# Errors are never wrapped: a path or a PV name broken across lines cannot be copied back.
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_campaign_error(exc: Exception) -> int:
    from orchestrator.spec import CampaignError

    if isinstance(exc, CampaignError):
        # The messages quote the file ("got '[x]'"): shown as written, never read as markup.
        err_console.print(Text.assemble((exc.source, "bold red"), f": {len(exc.issues)} problem(s) in the "
                                        "campaign file"))
        for issue in exc.issues:
            err_console.print(Text.assemble("  ", (issue.path or "<file>", "yellow"), f": {issue.message}"),
                              soft_wrap=True)
    else:
        err_console.print(Text.assemble(("error", "bold red"), f": {exc}"))
    return EXIT_BAD_INPUT


# ---- validate -----------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.spec import CampaignError, load_campaign

    try:
        spec = load_campaign(args.file)
    except CampaignError as exc:
        return _print_campaign_error(exc)
    console.print(f"[green]ok[/]: {args.file} defines campaign {spec.name!r}: "
                  f"{len(spec.parameters)} parameters, {len(spec.objectives)} objective(s), "
                  f"planner {spec.planner.name}, {spec.budget.max_trials} trials")
    return EXIT_OK


# ---- run ----------------------------------------------------------------------
class TerminalProgress:
    """Live progress for ``labpilot run``: a bar on a terminal, one line per trial elsewhere."""

    def __init__(self, live: bool) -> None:
        self.live = live
        self.progress = None
        self.task = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def started(self, runtime) -> None:  # noqa: ANN001
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        spec = runtime.spec
        done = sum(runtime.ledger.counts(runtime.campaign_id)[s] for s in ("completed", "failed"))
        what = "resuming" if runtime.resumed else "starting"
        console.print(f"[bold]{spec.name}[/]: {what}; planner [cyan]{spec.planner.name}[/], "
                      f"{len(runtime.runners)} instrument station(s), budget {spec.budget.max_trials} trials")
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("trial"), MofNCompleteColumn(), BarColumn(bar_width=28),
            TextColumn("best [bold green]{task.fields[best]}[/]"),
            TextColumn("[magenta]{task.fields[model]}[/]"),
            TextColumn("[dim]{task.fields[activity]}[/]"), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self.task = self.progress.add_task("trials", total=spec.budget.max_trials, completed=done,
                                           best=self._best(runtime), activity="starting",
                                           model=_model_line(runtime))
        self.progress.start()

        def refresh() -> None:
            while not self._stop.wait(0.2):
                busy = [f"{r.instrument.name}: {r.activity}" for r in runtime.runners if r.activity != "idle"]
                self.progress.update(self.task, activity="; ".join(busy) or "planning",
                                     model=_model_line(runtime))

        self._thread = threading.Thread(target=refresh, daemon=True)
        self._thread.start()

    def _best(self, runtime) -> str:  # noqa: ANN001
        b = runtime.best()
        if b.value is not None:
            return f"{b.value:.5g}"
        if b.hypervolume is not None:
            return f"HV {b.hypervolume:.4g} ({len(b.pareto)} on front)"
        return "-"

    def trial_changed(self, runtime, number: int, state: str, info: str = "") -> None:  # noqa: ANN001
        if state not in ("completed", "failed", "vetoed", "waiting", "rejected", "abandoned"):
            return
        if state == "waiting":  # for a person: say how to answer
            info = f"{info}; approve or reject it: labpilot approve|reject {runtime.output_dir} {number}"
        if self.progress is not None:
            self.progress.update(self.task, advance=1 if state in ("completed", "failed", "abandoned") else 0,
                                 best=self._best(runtime))
            if state != "completed":
                self.progress.console.print(Text.assemble(f"  trial {number} ", (state, "red"), f": {info}"))
        else:
            console.print(f"trial {number:>3} {state:<9} {info}  best {self._best(runtime)}  "
                          f"{_model_line(runtime)}", markup=False)

    def finished(self, runtime, result) -> None:  # noqa: ANN001
        self._stop.set()
        if self.progress is not None:
            self.progress.update(self.task, activity="done")
            self.progress.stop()


def _model_line(runtime) -> str:  # noqa: ANN001
    """The newest surrogate model version, for the progress line."""
    models = getattr(runtime, "models", None)
    v = models.latest() if models is not None else None
    if v is None:
        return "model -" if models is not None else ""
    cover = v.calibration.get("overall", {}).get("coverage_95")
    return (f"model {v.label} ({v.n_points} pts"
            + (f", 95% cover {cover:.0%}" if cover is not None else "") + ")")


def _setup_logging(output_dir: Path) -> None:
    handler = logging.FileHandler(output_dir / "campaign.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("labpilot", "bluesky", "ophyd", "botorch"):
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.setLevel(logging.INFO)
        lg.propagate = False
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers = [handler]
    logging.getLogger("py.warnings").propagate = False


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.prefect_api import PrefectAPI

    t0 = time.perf_counter()
    with _sigint_noted():
        return _run(args, t0, PrefectAPI().start_in_background())  # the API overlaps with set-up


@contextmanager
def _sigint_noted():
    """Ctrl-C raises KeyboardInterrupt as always, and is also noted (orchestrator.interrupt)."""
    from orchestrator.interrupt import INTERRUPT

    INTERRUPT.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def noted(signum: int, frame: Any) -> None:
        INTERRUPT.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, noted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace, t0: float, api: Any) -> int:
    from orchestrator.interrupt import INTERRUPT
    from orchestrator.ledger import CampaignRefused, sqlite_url
    from orchestrator.spec import CampaignError, load_campaign

    try:
        spec = load_campaign(args.file)
    except CampaignError as exc:
        api.stop_when_ready()
        return _print_campaign_error(exc)
    settings = Settings()
    output_dir = Path(args.output or spec.output or Path(settings.runs_dir) / spec.name)
    if args.fresh and output_dir.exists():
        for f in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "trials.csv", "summary.json",
                  "campaign.log", STORE_POINTER):
            (output_dir / f).unlink(missing_ok=True)
    clash = _campaign_clash(spec, output_dir, settings)
    if clash:
        api.stop_when_ready()
        err_console.print(f"[bold red]error[/]: {escape(clash)}")
        return EXIT_BAD_INPUT
    output_dir.mkdir(parents=True, exist_ok=True)
    if spec.store:  # so that 'labpilot status DIR' and 'export DIR' find the campaign's own store
        (output_dir / STORE_POINTER).write_text(json.dumps({"url": spec.store}))
    _setup_logging(output_dir)
    try:
        from orchestrator.flows import CampaignRuntime, run_campaign

        live = console.is_terminal and not args.quiet
        runtime = CampaignRuntime(spec, output_dir, observer=TerminalProgress(live))
        if args.console is not None:
            server = _serve_console(runtime, args.console)
            if server is None:
                return EXIT_BAD_INPUT
        t_setup = time.perf_counter() - t0
        if api.started_server or api.url is None:
            with console.status("starting Prefect's local server (set PREFECT_API_URL to use a running one)"):
                api.wait()
        api.wait()
        t_ready = time.perf_counter() - t0
        with api.settings():
            result = run_campaign(runtime)
        if INTERRUPT.is_set() and result.status != "interrupted":
            raise KeyboardInterrupt  # noted while no step of the loop was there to see it
    except KeyboardInterrupt:
        _print_resume_hint(args.file, output_dir)
        return EXIT_INTERRUPTED
    except CampaignRefused as exc:
        err_console.print(Text(f"error: {exc}"), soft_wrap=True)
        return EXIT_BAD_INPUT
    finally:
        api.stop()
        if "server" in locals() and server is not None:
            server.stop()
        if "runtime" in locals():
            runtime.close()
    if result.status == "interrupted":
        _print_resume_hint(args.file, output_dir)
        runtime.ledger.close()
        return EXIT_INTERRUPTED
    total = time.perf_counter() - t0
    own = None if runtime.ledger.url == sqlite_url(output_dir) else spec.name  # a shared store: per campaign
    export_path = _export(runtime.ledger, runtime.campaign_id, output_dir, "csv", own)
    timing = {
        "total_seconds": total,
        "setup_seconds": t_setup,
        "prefect_ready_after_seconds": t_ready,
        "prefect_started_server": api.started_server,
        "prefect_server_start_seconds": api.seconds_to_ready,
        "campaign_seconds": result.seconds,
        **{f"median_{k}_seconds": _median(v) for k, v in result.timings.items()},
        **{f"sum_{k}_seconds": sum(v) for k, v in result.timings.items()},
        "overhead_per_trial_seconds": sum(result.timings["overhead"]) / max(1, len(result.timings["instrument"])),
    }
    _print_summary(runtime, result, export_path, timing)
    (output_dir / (f"summary-{own}.json" if own else "summary.json")).write_text(json.dumps(
        {"campaign": spec.name, "status": result.status, "reason": result.reason, "counts": result.counts,
         "best_value": result.best.value, "best_parameters": result.best.parameters,
         "hypervolume": result.best.hypervolume, "timing": timing}, indent=2, default=str))
    runtime.ledger.close()
    return EXIT_OK if result.status in ("finished", "stopped") else EXIT_FAILURE


def _serve_console(runtime, where: str):  # noqa: ANN001, ANN202
    """Serve the web console of the campaign being run, fed in-process from its ledger; ``where``
    is ``[HOST:]PORT``. ``None`` (and the reason printed) when it may not or cannot start."""
    from orchestrator.console.app import create_app, serve_in_thread
    from orchestrator.console.auth import UnsafeBind, check_bind

    host, _, port = where.rpartition(":")
    host = host or "127.0.0.1"
    try:
        check_bind(host, runtime.ledger)
        app = create_app([runtime.ledger], runtime.ledger, auth_required=bool(runtime.ledger.users()),
                         live_source="listeners")
        server = serve_in_thread(app, host, int(port or 0))
    except (UnsafeBind, ValueError, OSError) as exc:
        err_console.print(Text(f"error: the console cannot start: {exc}"), soft_wrap=True)
        return None
    console.print(Text(f"console: {server.url}/ (Ctrl-C stops the campaign and the console)"))
    return server


def _print_resume_hint(file: str, output_dir: Path) -> None:
    err_console.print("interrupted: the ledger holds every trial so far (a trial that was running is "
                      f"recorded as abandoned); run 'labpilot run {file} --output {output_dir}' to resume",
                      markup=False, soft_wrap=True)


def _median(v: list[float]) -> float | None:
    if not v:
        return None
    s = sorted(v)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def _print_summary(runtime, result, export_path: Path, timing: dict[str, Any]) -> None:  # noqa: ANN001
    spec = runtime.spec
    # Every value is ledger or device text (a reason, a categorical choice): Text, never markup.
    table = Table(title=Text(f"campaign {spec.name}: {result.status} ({result.reason})"), show_header=False)
    table.add_column(style="bold")
    table.add_column()

    def row(key: str, value: str) -> None:
        table.add_row(key, Text(value))

    c = result.counts
    row("trials", f"{c['completed']} completed, {c['failed']} failed, {c['vetoed']} vetoed, "
                  f"{c['abandoned']} abandoned")
    best = result.best
    optimum = _known_optimum(spec)
    if best.value is not None:
        o = spec.objectives[0]
        row("best value", f"{o.name} = {best.value:.6g} ({o.goal})")
        row("best parameters", ", ".join(f"{k}={_fmt(v)}" for k, v in best.parameters.items()))
        if o.name in optimum:
            row("known optimum", f"{optimum[o.name]:.6g}; simple regret "
                                 f"{abs(best.value - optimum[o.name]):.4g}")
    elif best.hypervolume is not None:
        row("Pareto front", f"{len(best.pareto)} trials")
        row("hypervolume", f"{best.hypervolume:.4g}"
            + (f" of {optimum['hypervolume']:.4g} possible" if "hypervolume" in optimum else ""))
    else:
        row("best value", "none yet (no completed trial)")
    models = runtime.ledger.model_versions(runtime.campaign_id)
    if models:
        last = models[-1]
        cover = (last.calibration or {}).get("overall", {})
        lat = sorted(m.metrics.get("latency_from_stop", 0.0) for m in models)
        row("surrogate models",
            f"{len(models)} versions; newest {last.label} on {last.n_points} results "
            f"(saved {Path(last.path).name}); result -> new version median {_s(lat[len(lat) // 2])}"
            + (f"; 95% interval coverage {cover['coverage_95']:.0%} over the last {cover['count']} "
               "results" if cover.get("coverage_95") is not None else ""))
    row("ledger", str(runtime.ledger.url))
    row("export", str(export_path))
    row("time", f"{timing['total_seconds']:.1f} s in all; Prefect API ready at "
                f"{timing['prefect_ready_after_seconds']:.1f} s "
                f"({'temporary server' if timing['prefect_started_server'] else 'existing server'}); "
                f"median planner {_s(timing['median_propose_seconds'])}, instrument "
                f"{_s(timing['median_instrument_seconds'])}, orchestration "
                f"{_s(timing['overhead_per_trial_seconds'])} per trial")
    console.print(table)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _fmt(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def _known_optimum(spec) -> dict[str, float]:  # noqa: ANN001
    from orchestrator.rehearsal import known_optimum  # hardware, a person, an emulator: none

    return known_optimum(spec)


# ---- status and export -----------------------------------------------------------
STORE_POINTER = "ledger.json"  # in a campaign directory whose ledger is the campaign's own store: URL


def _ledger_url(directory: str | Path, store: str | None = None) -> str:
    """Where the ledger of a campaign directory is: ``--store``, else the campaign's ``store:``
    that ``labpilot run`` noted in DIR/ledger.json, else ``LABPILOT_LEDGER_URL``, else
    DIR/ledger.sqlite."""
    from orchestrator.ledger import sqlite_url

    d = Path(directory)
    if store:
        return store
    if (d / STORE_POINTER).is_file():
        try:
            return json.loads((d / STORE_POINTER).read_text())["url"]
        except (ValueError, KeyError, TypeError):
            raise FileNotFoundError(f"{d / STORE_POINTER} is not the note 'labpilot run' writes; give the "
                                    "ledger with --store URL") from None
    if Settings().ledger_url:
        return Settings().ledger_url
    if not (d / "ledger.sqlite").is_file():
        raise FileNotFoundError(f"{d} holds no ledger.sqlite; give the directory a 'labpilot run' wrote "
                                "(its --output), or the ledger with --store URL")
    return sqlite_url(d)


def _open_ledger(directory: str, store: str | None = None):  # noqa: ANN202
    from orchestrator.ledger import Ledger

    return Ledger(_ledger_url(directory, store))


def _is_shared(ledger, directory: str | Path) -> bool:  # noqa: ANN001
    """A ledger other than DIR/ledger.sqlite is a store several campaigns may share."""
    from orchestrator.ledger import sqlite_url

    return ledger.url != sqlite_url(directory)


def _choose_campaign(ledger, name: str | None):  # noqa: ANN001, ANN202
    """The campaign called ``name``, or the ledger's only one; ``LookupError`` saying what to pass."""
    if name:
        return ledger.campaign_by_name(name)
    held = ledger.campaigns()
    if not held:
        raise LookupError("the ledger holds no campaign; run one first with 'labpilot run FILE'")
    if len(held) > 1:
        raise LookupError(f"the ledger holds {len(held)} campaigns: {', '.join(c.name for c in held)}; "
                          "choose one with --campaign NAME")
    return held[0]


def _open_campaign(args: argparse.Namespace):  # noqa: ANN202
    ledger = _open_ledger(args.dir, args.store)
    try:
        return ledger, _choose_campaign(ledger, args.campaign)
    except LookupError:
        ledger.close()
        raise


def _short(v: Any) -> str:
    """A number as short as it reads (4 significant digits), anything else as text."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _trial_cells(t) -> dict[str, str]:  # noqa: ANN001
    p = t.proposal
    state = "waiting" if t.state == "proposed" and t.awaiting else t.state  # for a person's approval
    return {"trial": str(t.number), "state": state, "instrument": t.instrument or "",
            "planner": p.planner if p else "", "model": (p.model_version or "") if p else "",
            "unseen": _short(p.model_unseen) if p else "", "ood": _short(p.ood_score) if p else "",
            "reason": t.reason or (t.awaiting or "")}


def _status_table(campaign, trials: list, width: int):  # noqa: ANN001, ANN202
    """The trials as a table with a column per parameter and outcome, or, where that does not fit
    in ``width`` columns, a block per trial. Ledger text (reasons, names, choices) is shown as
    written, never read as rich markup."""
    from rich.console import Group
    from rich.text import Text

    params = list(dict.fromkeys(k for t in trials for k in t.parameters))
    outcomes = list(dict.fromkeys(k for t in trials for k in (t.observation.values if t.observation else {})))
    cells = [_trial_cells(t) for t in trials]
    for c, t in zip(cells, trials, strict=True):
        c.update({f"p:{k}": _short(v) for k, v in t.parameters.items()})
        c.update({f"o:{k}": _short(v) for k, v in (t.observation.values if t.observation else {}).items()})
    # A column that says the same of every trial (one instrument, one planner) goes in the title.
    same = {k: cells[0][k] for k in ("instrument", "planner") if cells and len({c[k] for c in cells}) == 1}
    keys = ["trial", "state", *(k for k in ("instrument", "planner") if k not in same),
            *(f"p:{k}" for k in params), *(f"o:{k}" for k in outcomes),
            *(k for k in ("model", "unseen", "ood") if any(c[k] for c in cells))]
    waiting = sum(1 for t in trials if t.state == "proposed" and t.awaiting)
    title = Text(f"campaign {campaign.name}: {campaign.status}"
                 + (f" ({campaign.stop_reason})" if campaign.stop_reason else "")
                 + ("; paused by an operator ('labpilot resume DIR')" if campaign.paused else "")
                 + (f"; {waiting} waiting for approval ('labpilot approve|reject DIR TRIAL')" if waiting else "")
                 + "".join(f"; {k} {v}" for k, v in same.items() if v))

    def header(k: str) -> str:
        return k.split(":", 1)[-1]

    widths = {k: max([len(header(k))] + [len(c.get(k, "")) for c in cells]) for k in keys}
    base = sum(widths.values()) + 3 * len(keys) + 1  # box borders and padding: 3 a column, and one
    reason_width = max([len(c["reason"]) for c in cells] + [6])
    if base <= width:
        # Reasons in a column where they fit (folded from 20 wide); else listed under the table.
        # A completed trial's reason is always 'measured': the list leaves it out.
        in_column = base + 3 + min(reason_width, 20) <= width
        table = Table(title=title)
        for k in keys:
            table.add_column(Text(header(k)), no_wrap=True,
                             justify="right" if k.startswith(("p:", "o:")) or k in ("trial", "unseen", "ood")
                             else "left", style="cyan" if k.startswith("o:") else None)
        if in_column:
            table.add_column("reason", overflow="fold", min_width=min(reason_width, 20))
        for c in cells:
            table.add_row(*(Text(c.get(k, "")) for k in keys), *([Text(c["reason"])] if in_column else []))
        notes = [] if in_column else [Text(f"trial {c['trial']} {c['state']}: {c['reason']}")
                                      for c in cells if c["reason"] and c["state"] != "completed"]
        return Group(table, *notes)
    blocks: list = [Text(title.plain, style="bold")]
    for c in cells:
        head = [f"trial {c['trial']}", c["state"], *(c[k] for k in ("instrument", "planner") if k not in same),
                *(f"{k} {c[k]}" for k in ("model", "unseen", "ood") if c[k])]
        measured = [f"{k}={c[f'o:{k}']}" for k in outcomes if f"o:{k}" in c]
        blocks += _wrapped([h for h in head if h], width, "")
        blocks += _wrapped([f"{k}={c[f'p:{k}']}" for k in params if f"p:{k}" in c], width, "  ")
        blocks += _wrapped(measured, width, "  -> ", style="cyan") if measured else []
        if c["reason"]:
            blocks.append(Text(f"  reason: {c['reason']}"))
    return Group(*blocks)


def _wrapped(items: list[str], width: int, indent: str, style: str = ""):  # noqa: ANN202
    """``items`` two spaces apart, on as few lines of ``width`` as they fill, each line indented
    (an item is never split; one wider than a line gets a line of its own)."""
    from rich.text import Text

    lines, line = [], ""
    for item in items:
        if line and len(indent) + len(line) + 2 + len(item) > width:
            lines.append(line)
            line = ""
        line = f"{line}  {item}" if line else item
    lines.append(line)
    pad = " " * len(indent)
    return [Text((indent if i == 0 else pad) + text, style=style) for i, text in enumerate(lines)]


def cmd_status(args: argparse.Namespace) -> int:
    from rich.text import Text

    try:
        ledger, campaign = _open_campaign(args)
    except (FileNotFoundError, LookupError) as exc:
        err_console.print(Text.assemble(("error", "bold red"), f": {exc}"))
        return EXIT_BAD_INPUT
    console.print(_status_table(campaign, ledger.trials(campaign.id), console.width))
    counts = ledger.counts(campaign.id)
    console.print(f"{sum(counts.values())} trials: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v),
                  markup=False)
    for station, event in ledger.out_of_rotation(campaign.id).items():
        who = f"{event.user} ({event.actor})" if event.user else event.actor
        console.print(Text(f"station {station} is out of rotation since {event.at:%Y-%m-%d %H:%M:%S} "
                           f"({who}): {event.reason}; 'labpilot restore {args.dir} {station}' brings it back",
                           style="bold yellow"), soft_wrap=True)
    numbers = {t.id: t.number for t in ledger.trials(campaign.id)}
    for line in _instrument_lines(ledger.suspensions(campaign.id), ledger.retries(campaign.id), numbers):
        console.print(line, markup=False, highlight=False)
    ledger.close()
    return EXIT_OK


STATUS_EVENTS = 10  # the latest suspensions and failed read attempts 'labpilot status' lists


def _clock(t: Any) -> str:
    """A ledger time (UTC; SQLite gives it back naive) as this host's local date and time."""
    from datetime import UTC

    if t is None:
        return "-"
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _instrument_lines(suspensions: list, retries: list, numbers: dict[int, int]) -> list[str]:  # noqa: ANN001
    """What held or troubled the instruments: each interlock suspension (PV, the value that
    tripped it, when, and when the run went on) and each failed read attempt, the latest first."""
    lines = []
    if suspensions:
        lines.append(f"interlocks: {len(suspensions)} suspension(s)"
                     + (f", the latest {STATUS_EVENTS}:" if len(suspensions) > STATUS_EVENTS else ":"))
        for r in reversed(suspensions[-STATUS_EVENTS:]):
            during = f" during trial {numbers[r.trial_id]}" if r.trial_id in numbers else " while idle"
            value = f" = {r.value:g}" if r.value is not None else ""
            then = (f"; back in range at {_clock(r.cleared_at)}"
                    + (f" ({r.cleared_value:g})" if r.cleared_value is not None else "")
                    + f", the run went on at {_clock(r.resumed_at)}") if r.cleared_at else "; still out of range"
            lines.append(f"  {r.instrument}: {r.pv}{value} (allowed {r.allowed}) tripped at "
                         f"{_clock(r.tripped_at)}{during}{then}")
    if retries:
        lines.append(f"read retries: {len(retries)} failed attempt(s)"
                     + (f", the latest {STATUS_EVENTS}:" if len(retries) > STATUS_EVENTS else ":"))
        for r in reversed(retries[-STATUS_EVENTS:]):
            trial = f"trial {numbers[r.trial_id]}" if r.trial_id in numbers else "no trial"
            lines.append(f"  {trial} on {r.instrument}: {r.step}, attempt {r.attempt} of {r.attempts_allowed}, "
                         f"failed at {_clock(r.at)}: {r.error}")
    return lines


def _export(ledger, campaign_id: int, directory: Path, fmt: str, name: str | None = None) -> Path:  # noqa: ANN001
    """Write the campaign's trials into ``directory``: ``trials.FMT``, or ``trials-NAME.FMT``
    where ``name`` is given (a shared store: several campaigns may write into one directory)."""
    frame = ledger.trials_frame(campaign_id)
    path = Path(directory) / (f"trials-{name}.{fmt}" if name else f"trials.{fmt}")
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        for col in frame.columns:  # mixed-type parameter columns (categoricals) as text for Arrow
            if frame[col].dtype == object:
                frame[col] = frame[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
        frame.to_parquet(path, index=False)
    return path


def cmd_export(args: argparse.Namespace) -> int:
    from rich.text import Text

    try:
        ledger, campaign = _open_campaign(args)
    except (FileNotFoundError, LookupError) as exc:
        err_console.print(Text.assemble(("error", "bold red"), f": {exc}"))
        return EXIT_BAD_INPUT
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    path = _export(ledger, campaign.id, Path(args.dir), args.format,
                   campaign.name if _is_shared(ledger, args.dir) else None)
    console.print(f"wrote {path} ({len(ledger.trials(campaign.id))} trials)", markup=False)
    ledger.close()
    return EXIT_OK


def _campaign_clash(spec, output_dir: Path, settings: Settings) -> str | None:  # noqa: ANN001
    """Why ``spec`` must not run into ``output_dir``: a directory's own ledger belongs to one
    campaign (its exports and summary would be overwritten). ``None`` when it may; a shared
    store (``store:`` or ``LABPILOT_LEDGER_URL``) holds several, and their files are named
    per campaign."""
    from orchestrator.ledger import Ledger, sqlite_url

    if spec.store or settings.ledger_url or not (output_dir / "ledger.sqlite").is_file():
        return None
    ledger = Ledger(sqlite_url(output_dir))
    try:
        others = [c.name for c in ledger.campaigns() if c.name != spec.name]
    finally:
        ledger.close()
    if not others:
        return None
    return (f"{output_dir} holds campaign {', '.join(map(repr, others))}, and this file is campaign "
            f"{spec.name!r}; a directory holds one campaign: give this one its own with --output DIR "
            "(or output: in the file), or run it with a shared store: URL")


def cmd_bench(args: argparse.Namespace) -> int:
    import platform
    import shlex

    from orchestrator.bench import check, failures, parse_problem, planner_names, run_bench, write

    problems = [p for group in args.problems for p in group.split(",") if p]
    planners = [p for group in args.planners for p in group.split(",") if p]
    try:
        options = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as exc:
        err_console.print(f"[bold red]error[/]: --options is not JSON ({exc})")
        return EXIT_BAD_INPUT
    if not isinstance(options, dict):
        err_console.print("[bold red]error[/]: --options must be a JSON object such as "
                          "'{\"bo\": {\"num_restarts\": 4}}'")
        return EXIT_BAD_INPUT
    aliases = {k: v.get("planner") for k, v in options.items() if isinstance(v, dict) and "planner" in v}
    unknown = [p for p in planners if aliases.get(p, p) not in planner_names()]
    if unknown:
        err_console.print(f"[bold red]error[/]: unknown planner(s) {unknown}; choose from {planner_names()}")
        return EXIT_BAD_INPUT
    try:
        parsed = [parse_problem(p) for p in problems]
    except ValueError as exc:
        err_console.print(f"[bold red]error[/]: {exc}")
        return EXIT_BAD_INPUT
    if args.initial >= args.budget:
        err_console.print("[bold red]error[/]: --initial must be smaller than --budget")
        return EXIT_BAD_INPUT
    cannot = check(parsed, planners, args.budget, args.initial, options)
    if cannot:  # before any run: a pair that cannot run would otherwise fail after hours of others
        err_console.print("[bold red]error[/]: these cannot run (nothing was run):")
        err_console.print("\n".join(f"  {line}" for line in cannot), markup=False)
        err_console.print("  drop the planner or the problem, or change its options")
        return EXIT_BAD_INPUT
    command = "labpilot bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 \
        else "labpilot bench (called from Python)"
    meta = {"command": command, "seeds": args.seeds, "budget": args.budget, "batch": args.batch,
            "initial": args.initial, "python": platform.python_version()}
    t0 = time.perf_counter()
    result = run_bench(problems, planners, args.seeds, args.budget, args.batch, args.initial, options,
                       progress=None if args.quiet else lambda line: console.print(f"[dim]{line}[/]"))
    md = write(result, {**meta, "seconds": time.perf_counter() - t0}, Path(args.out))
    console.print(md.read_text(), markup=False)
    console.print(f"wrote {args.out} and {md} in {time.perf_counter() - t0:.0f} s")
    failed = failures(result)
    if failed:
        err_console.print(f"[bold red]error[/]: runs failed; what finished is in {args.out}:")
        err_console.print("\n".join(f"  {line}" for line in failed), markup=False)
        return EXIT_FAILURE
    return EXIT_OK


# ---- the stream's own processes -----------------------------------------------------
def cmd_proxy(args: argparse.Namespace) -> int:
    """Run the stream's proxy alone, for a campaign whose processes live on several hosts."""
    from orchestrator.stream import Proxy, StreamError, is_loopback

    wide = [a for a in (args.publish, args.subscribe) if not is_loopback(a)]
    if wide:
        err_console.print(Text(f"warning: binding {', '.join(wide)} beyond this host: the stream has no "
                               "authentication yet, so anyone who can reach these ports can read the campaign's "
                               "documents and publish forged ones; bind 127.0.0.1 unless the network is yours "
                               "alone"), soft_wrap=True)
    try:
        proxy = Proxy(args.publish, args.subscribe).start()
    except StreamError as exc:
        err_console.print(f"[bold red]error[/]: {escape(str(exc))}")
        return EXIT_BAD_INPUT
    console.print(f"stream proxy: publishers connect to [bold]{proxy.publish_address}[/], subscribers to "
                  f"[bold]{proxy.subscribe_address}[/]\n  export LABPILOT_STREAM_PUBLISH={proxy.publish_address}"
                  f"\n  export LABPILOT_STREAM_SUBSCRIBE={proxy.subscribe_address}\nCtrl-C stops it.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()
    return EXIT_OK


def cmd_trainer(args: argparse.Namespace) -> int:
    """Train a campaign's surrogates in this process (a GPU host can serve a lab PC): catch up
    from the ledger, then learn from the stream; versions go to the ledger and the stream."""
    from orchestrator.learning import feed_trainer, next_version_number
    from orchestrator.spec import CampaignSpec
    from orchestrator.stream import Publisher, StreamError, Subscriber
    from planners.surrogates import SurrogateTrainer

    settings = Settings()
    if not (settings.stream_publish and settings.stream_subscribe):
        err_console.print("[bold red]error[/]: a trainer in its own process needs the stream's addresses: set "
                          "LABPILOT_STREAM_PUBLISH and LABPILOT_STREAM_SUBSCRIBE (run 'labpilot proxy' to get "
                          "them), and run the campaign with LABPILOT_TRAINER=external")
        return EXIT_BAD_INPUT
    try:
        ledger = _open_ledger(args.dir) if not settings.ledger_url else _ledger_from_url(settings.ledger_url)
        campaign = ledger.campaign()
    except (FileNotFoundError, LookupError) as exc:
        err_console.print(f"[bold red]error[/]: {escape(str(exc))}")
        return EXIT_BAD_INPUT
    spec = CampaignSpec.model_validate(campaign.spec)
    publisher = Publisher(settings.stream_publish, name=f"trainer-{campaign.id}")
    ledger.listeners.append(lambda topic, body: publisher.publish(topic, body) if topic == "model" else None)

    def announce(version) -> None:  # noqa: ANN001
        ledger.record_model_version(campaign.id, version.record())
        console.print(f"model {version.label}: {version.n_points} results, {version.metrics.get('update')} "
                      f"in {version.metrics.get('seconds', 0):.2f} s")

    trainer = SurrogateTrainer(spec.problem(), args.dir, switch_at=settings.surrogate_switch_at,
                               on_version=announce, device=args.device,
                               first_number=next_version_number(ledger, campaign.id))
    subscriber = Subscriber(settings.stream_subscribe, topics=("doc",))
    try:
        # Before the ledger is read: a result recorded after that read is only seen on the stream,
        # and ZeroMQ drops what is published before a new subscription has reached the publisher.
        subscriber.wait_linked(publisher)
    except StreamError as exc:
        subscriber.close()
        publisher.close()
        err_console.print(f"[bold red]error[/]: {escape(str(exc))}")
        return EXIT_BAD_INPUT
    listener = feed_trainer(trainer, ledger, campaign.id, subscriber)
    stop = threading.Event()
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # SIGTERM (a service manager, Popen.terminate) stops it as Ctrl-C does
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        console.print(f"training surrogates of campaign {campaign.name} on {trainer.device} "
                      f"({trainer.n_results} results so far); Ctrl-C stops")
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if on_main_thread:  # None: the handler before was not set from Python
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        listener.stop()
        trainer.stop()
        publisher.close()
    return EXIT_OK


def _ledger_from_url(url: str):  # noqa: ANN202
    from orchestrator.ledger import Ledger

    return Ledger(url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labpilot", description="Run self-driving-laboratory campaigns.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) a campaign")
    p.add_argument("file", help="campaign YAML file")
    p.add_argument("--output", help="campaign directory: ledger, exports, logs (default runs/<name>)")
    p.add_argument("--fresh", action="store_true", help="discard an earlier run in the directory first")
    p.add_argument("--quiet", action="store_true", help="no live progress bar")
    p.add_argument("--console", nargs="?", const="127.0.0.1:8765", metavar="[HOST:]PORT",
                   help="serve the web console of this campaign (default 127.0.0.1:8765; :0 picks a free port)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a campaign file and report every problem")
    p.add_argument("file")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("status", help="table of a campaign's trials and their states")
    p.add_argument("dir", help="campaign directory")
    _campaign_options(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("export", help="write trials.csv or trials.parquet into the campaign directory")
    p.add_argument("dir", help="campaign directory")
    _campaign_options(p)
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("bench", help="run planners side by side on problems with paired seeds")
    p.add_argument("--problems", nargs="+", required=True,
                   help="branin, hartmann6, branincurrin, branin_failing, NAME-noisy, NAME:noise=SD, or a "
                        "dataset folder (comma- or space-separated)")
    p.add_argument("--planners", nargs="+", required=True, help="e.g. bo,ax,random,sobol")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--budget", type=int, default=30, help="trials per run, the initial design included")
    p.add_argument("--batch", type=int, default=1, help="trials per proposal (q)")
    p.add_argument("--initial", type=int, default=5, help="initial design, shared by all planners")
    p.add_argument("--options", help="planner options as JSON: '{\"bo\": {\"num_restarts\": 4}}'")
    p.add_argument("--out", default="bench.json", help="JSON file; a Markdown table is written beside it")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("trainer", help="train a campaign's surrogates in this process, from the stream")
    p.add_argument("dir", help="campaign directory (models are saved under DIR/models)")
    p.add_argument("--device", help="torch device (default: cuda when there is one, else cpu)")
    p.set_defaults(func=cmd_trainer)
    p = sub.add_parser("proxy", help="run the stream's proxy, for a campaign that spans hosts")
    p.add_argument("--publish", default="tcp://127.0.0.1:5577",
                   help="address publishers connect to (loopback by default; the stream has no authentication yet)")
    p.add_argument("--subscribe", default="tcp://127.0.0.1:5578", help="address subscribers connect to")
    p.set_defaults(func=cmd_proxy)
    from orchestrator.control_cli import add_parsers as add_control_parsers

    add_control_parsers(sub, _campaign_options)
    from orchestrator.console.commands import add_parsers as add_console_parsers

    add_console_parsers(sub)
    __import__("simulators.ioc_cli").ioc_cli.add_parsers(sub)
    return parser


def _campaign_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--campaign", metavar="NAME", help="the campaign to show, where the ledger holds several")
    p.add_argument("--store", metavar="URL", help="the ledger's SQLAlchemy URL (default: the campaign's "
                                                  "store:, else LABPILOT_LEDGER_URL, else DIR/ledger.sqlite)")


def main(argv: list[str] | None = None) -> int:
    configure_prefect_environment()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage already; keep its code
        return int(exc.code or 0)
    try:
        return args.func(args)
    except Exception as exc:  # an unexpected failure: say so plainly, keep the trace in the log
        logging.getLogger("labpilot").exception("labpilot %s failed", args.command)
        err_console.print(f"[bold red]labpilot {args.command} failed[/]: {type(exc).__name__}: {escape(str(exc))}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

