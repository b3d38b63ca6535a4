"""The operator's command-line verbs: pause, resume, stop, approve, reject, requeue, abandon,
budget, add, tell, suggest, import, retire, restore (each through orchestrator.control).

Each prints what it did and exits 0, or 2 with the reason (trial not waiting,
wrong state, campaign unknown). A command to a running campaign waits (up to
``--wait`` seconds) for the campaign to carry it out and prints what came of
it; one to a campaign that is not running is queued and applies when it
resumes.
"""

from __future__ import annotations

import argparse
import getpass
import socket
from typing import Any

from rich.text import Text

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _actor() -> Any:
    from orchestrator.control import Actor

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = "unknown"
    return Actor(name=f"{user}@{socket.gethostname()}", role="operator", via="cli")


def _control(args: argparse.Namespace) -> Any:
    from orchestrator.cli import _open_campaign
    from orchestrator.control import Control

    ledger, campaign = _open_campaign(args)
    return Control(ledger, campaign.id)


def _refuse(message: str) -> int:
    from orchestrator.cli import err_console

    err_console.print(Text.assemble(("refused", "bold red"), f": {message}"), soft_wrap=True)
    return EXIT_BAD_INPUT


def _submit(args: argparse.Namespace, action: str, trial: int | None = None,
            cargs: dict[str, Any] | None = None, reason: str = "", control: Any = None) -> int:
    """Submit one command, wait for the running campaign to carry it out, and say what came of it."""
    from orchestrator.control import ControlError

    try:
        control = control or _control(args)
        live = control.live()
        command = control.submit(action, _actor(), trial=trial, args=cargs, reason=reason)
    except (ControlError, LookupError, FileNotFoundError) as exc:
        return _refuse(str(exc))
    what = f"{action}" + (f" trial {trial}" if trial is not None else "") + (
        f" station {cargs['station']}" if cargs and cargs.get("station") else "")
    return _say(args, control, command, live, what)


def _say(args: argparse.Namespace, control: Any, command: Any, live: bool, what: str) -> int:
    """What came of a submitted command: queued (the campaign is not running), carried out, or
    refused by the running campaign (exit 2)."""
    from orchestrator.cli import console

    if not live:
        console.print(Text(f"queued: {what} (command {command.id}); campaign {control.campaign.name!r} is not "
                           "running, so it applies when the campaign resumes ('labpilot run FILE')"))
        return EXIT_OK
    done = control.wait(command, timeout=args.wait)
    if done.status == "applied":
        console.print(Text(f"{done.outcome} (command {done.id}, carried out by the running campaign)"))
        return EXIT_OK
    if done.status == "refused":
        return _refuse(f"{what}: {done.outcome}")
    console.print(Text(f"queued: {what} (command {done.id}); the campaign has not taken it up within "
                       f"{args.wait:g} s, and will when it next looks"))
    return EXIT_OK


def cmd_simple(args: argparse.Namespace) -> int:
    return _submit(args, args.command, reason=args.reason or "")


def cmd_approve(args: argparse.Namespace) -> int:
    from orchestrator.control import ControlError, parse_assignments

    try:
        edits = parse_assignments(args.edit or [])
    except ControlError as exc:
        return _refuse(str(exc))
    return _submit(args, "approve", args.trial, {"edits": edits} if edits else None, args.reason or "")


def cmd_trial(args: argparse.Namespace) -> int:
    return _submit(args, args.command, args.trial, reason=args.reason or "")


def cmd_budget(args: argparse.Namespace) -> int:
    return _submit(args, "budget", cargs={"max_trials": args.max_trials, "max_wall_time": args.max_wall_time},
                   reason=args.reason or "")


def cmd_add(args: argparse.Namespace) -> int:
    from orchestrator.control import ControlError, parse_assignments

    try:
        point = parse_assignments(args.assignments)
    except ControlError as exc:
        return _refuse(str(exc))
    return _submit(args, "add", cargs={"parameters": point}, reason=args.reason or "")


def cmd_tell(args: argparse.Namespace) -> int:
    from orchestrator.control import ControlError, parse_assignments

    if args.failed is None and not args.assignments:
        return _refuse("give the measured outcomes (e.g. yield=71.5) or --failed REASON")
    try:
        values = parse_assignments(args.assignments)
    except ControlError as exc:
        return _refuse(str(exc))
    cargs = {"failed": args.failed} if args.failed is not None else {"values": values}
    return _submit(args, "tell", args.trial, cargs, reason=args.reason or "")


def cmd_station(args: argparse.Namespace) -> int:
    """``retire`` (take a station out of rotation) or ``restore`` (bring it back)."""
    return _submit(args, args.command, cargs={"station": args.station}, reason=args.reason or "")


def cmd_suggest(args: argparse.Namespace) -> int:
    """What a person is to measure next: the campaign's trials waiting on a manual instrument."""
    from orchestrator.cli import console

    try:
        control = _control(args)
    except (LookupError, FileNotFoundError) as exc:
        return _refuse(str(exc))
    todo = control.awaiting_result()[: args.n]
    manual = [i for i in control.spec.instruments if i.kind == "manual"]
    if not manual:
        return _refuse(f"campaign {control.campaign.name!r} has no 'kind: manual' instrument; its trials are "
                       "measured by its instruments (see 'labpilot status DIR')")
    if not todo:
        state = "running" if control.live() else "not running: start it with 'labpilot run FILE' and it proposes"
        console.print(Text(f"nothing to measure yet; the campaign is {state}"))
        return EXIT_OK
    outcomes = " ".join(f"{o}=..." for o in manual[0].outcomes or [])
    for t in todo:
        params = ", ".join(f"{k}={v}" for k, v in t.parameters.items())
        console.print(Text(f"trial {t.number} on {t.instrument}: {params}"))
    console.print(Text(f"then: labpilot tell {args.dir} TRIAL {outcomes}   (or --failed REASON)"))
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    import pandas as pd

    from orchestrator.control import ControlError

    try:
        control = _control(args)
    except (LookupError, FileNotFoundError) as exc:
        return _refuse(str(exc))
    try:
        frame = pd.read_csv(args.file)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        return _refuse(f"cannot read {args.file} as CSV: {exc}")
    try:
        live = control.live()
        command = control.import_rows(_actor(), frame, args.file)
    except ControlError as exc:
        return _refuse(str(exc))
    return _say(args, control, command, live, f"import of {len(command.args.get('rows', []))} rows")


def add_parsers(sub: Any, campaign_options: Any) -> None:
    """The verbs, on the ``labpilot`` parser's subcommands."""

    def verb(name: str, help_: str, func: Any, trial: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("dir", help="campaign directory")
        if trial:
            p.add_argument("trial", type=int, help="trial number (as 'labpilot status DIR' shows it)")
        campaign_options(p)
        p.add_argument("--reason", help="why (kept in the audit log)")
        p.add_argument("--wait", type=float, default=10.0,
                       help="seconds to wait for a running campaign to carry the command out (default 10)")
        p.set_defaults(func=func)
        return p

    verb("pause", "finish what runs, dispatch nothing new", cmd_simple)
    verb("resume", "undo a pause", cmd_simple)
    verb("stop", "finish what runs, then end the campaign", cmd_simple)
    p = verb("approve", "approve a proposal waiting for approval", cmd_approve, trial=True)
    p.add_argument("--edit", action="append", metavar="NAME=VALUE", help="change a parameter first (repeatable)")
    p = verb("reject", "reject a proposal waiting for approval", cmd_trial, trial=True)
    p.set_defaults(func=lambda a: cmd_trial(a) if a.reason else _refuse("say why: --reason ..."))
    verb("abandon", "abort a running trial's run; it yields no result", cmd_trial, trial=True)
    verb("requeue", "run an abandoned, failed or rejected trial again as a new trial", cmd_trial, trial=True)
    p = verb("budget", "change the campaign's budget", cmd_budget)
    p.add_argument("--max-trials", type=int)
    p.add_argument("--max-wall-time", type=float, metavar="SECONDS")
    p = verb("add", "add a trial by hand (still passed through the safety envelope)", cmd_add)
    p.add_argument("assignments", nargs="+", metavar="NAME=VALUE")
    p = verb("tell", "give the result of a trial a person measured", cmd_tell, trial=True)
    p.add_argument("assignments", nargs="*", metavar="OUTCOME=VALUE")
    p.add_argument("--failed", metavar="REASON", help="the experiment failed, and why")
    p = sub.add_parser("suggest", help="what a person is to measure next (trials on a manual instrument)")
    p.add_argument("dir", help="campaign directory")
    p.add_argument("-n", type=int, default=10, help="at most this many")
    campaign_options(p)
    p.set_defaults(func=cmd_suggest)
    for name, help_ in (("retire", "take an instrument station out of rotation: it is given no trials"),
                        ("restore", "bring a station that is out of rotation back")):
        p = verb(name, help_, cmd_station)
        p.add_argument("station", help="the station, as 'labpilot status DIR' names it (e.g. reactor-2)")
    p = verb("import", "add past results from a CSV (one column per parameter and outcome)", cmd_import)
    p.add_argument("file", help="CSV file")
