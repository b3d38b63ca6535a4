"""The console's command line: ``labpilot user add|token``, ``labpilot console``, ``labpilot report``.

``orchestrator.cli`` calls :func:`add_parsers` with its subparsers. Every handler returns an exit
code: 0, or 2 with one line on stderr saying what to fix.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _open(target: str | None, store: str | None, create: bool = False):  # noqa: ANN202
    """The ledger of a campaign directory (its store pointer honoured) or of a URL."""
    from orchestrator.ledger import Ledger, sqlite_url

    if store:
        return Ledger(store)
    if not target:
        raise FileNotFoundError("give a campaign directory or --store URL")
    if "://" in target:
        return Ledger(target)
    try:
        from orchestrator.cli import _ledger_url

        url = _ledger_url(target, None)
    except FileNotFoundError:
        if not create:
            raise
        Path(target).mkdir(parents=True, exist_ok=True)
        url = sqlite_url(target)
    return Ledger(url)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            raise ValueError("the two passwords differ; nothing was changed")
    if len(pw) < 8:
        raise ValueError("a password needs at least 8 characters; nothing was changed")
    return pw


def cmd_user_add(args: argparse.Namespace) -> int:
    from orchestrator.console.auth import hash_password

    try:
        password = _read_password(args.password_stdin)
        ledger = _open(args.dir, args.store, create=True)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    try:
        if ledger.user(args.name) is None:
            ledger.add_user(args.name, args.role, hash_password(password))
            print(f"user {args.name!r} added as {args.role}")
        else:
            ledger.update_user(args.name, role=args.role, password_hash=hash_password(password), disabled=False)
            print(f"user {args.name!r} updated: role {args.role}, new password")
    except ValueError as exc:
        return _fail(str(exc))
    finally:
        ledger.close()
    return EXIT_OK


def cmd_user_token(args: argparse.Namespace) -> int:
    from orchestrator.console.auth import new_token, token_hash

    try:
        ledger = _open(args.dir, args.store)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    try:
        token = new_token()
        ledger.add_token(args.name, token_hash(token), args.label)
    except LookupError as exc:
        return _fail(str(exc))
    finally:
        ledger.close()
    print(token)
    print("(shown once: keep it; send it as 'Authorization: Bearer TOKEN')", file=sys.stderr)
    return EXIT_OK


def cmd_console(args: argparse.Namespace) -> int:
    import uvicorn

    from orchestrator.console.app import create_app
    from orchestrator.console.auth import UnsafeBind, check_bind

    try:
        ledgers = [_open(d, args.store) for d in (args.dirs or [None])]
        users = _open(args.users, None) if args.users else ledgers[0]
        check_bind(args.host, users)
    except (FileNotFoundError, UnsafeBind) as exc:
        return _fail(str(exc))
    app = create_app(ledgers, users, auth_required=bool(users.users()))
    print(f"labpilot console on http://{args.host}:{args.port}/ ({sum(len(le.campaigns()) for le in ledgers)} "
          f"campaign(s); {'log in' if users.users() else 'no users: anonymous reads, loopback only'})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.console.report_html import write_report

    try:
        ledger = _open(args.dir, args.store)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    try:
        if args.campaign:
            campaign = ledger.campaign_by_name(args.campaign)
        else:
            held = ledger.campaigns()
            if len(held) != 1:
                return _fail(f"the ledger holds {len(held)} campaigns"
                             + (f" ({', '.join(c.name for c in held)}); choose one with --campaign NAME" if held
                                else "; run one first with 'labpilot run FILE'"))
            campaign = held[0]
        out = Path(args.out) if args.out else Path(args.dir or ".") / "report.html"
        written = write_report(ledger, campaign.id, out)
    except LookupError as exc:
        return _fail(str(exc))
    finally:
        ledger.close()
    print(f"wrote {written['html']} and {len(written['pngs'])} PNGs beside it")
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``user``, ``console`` and ``report`` to the ``labpilot`` subcommands."""
    store_help = "the ledger's SQLAlchemy URL (instead of DIR)"
    p = sub.add_parser("user", help="console users and their API tokens")
    usub = p.add_subparsers(dest="user_command", required=True)
    q = usub.add_parser("add", help="add a user (or change one's role and password)")
    q.add_argument("name")
    q.add_argument("dir", nargs="?", help="campaign directory whose ledger keeps the users")
    q.add_argument("--role", choices=("viewer", "operator", "admin"), required=True)
    q.add_argument("--store", metavar="URL", help=store_help)
    q.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    q.set_defaults(func=cmd_user_add)
    q = usub.add_parser("token", help="make a new API token for a user (printed once)")
    q.add_argument("name")
    q.add_argument("dir", nargs="?", help="campaign directory whose ledger keeps the users")
    q.add_argument("--store", metavar="URL", help=store_help)
    q.add_argument("--label", default="", help="what the token is for")
    q.set_defaults(func=cmd_user_token)
    p = sub.add_parser("console", help="serve the operator's web console")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="campaign directories (each one's ledger)")
    p.add_argument("--store", metavar="URL", help=store_help)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (not loopback: users are required)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--users", metavar="DIR_OR_URL", help="the ledger that keeps the users (default: the first)")
    p.set_defaults(func=cmd_console)
    p = sub.add_parser("report", help="write a self-contained HTML report with PNG plots")
    p.add_argument("dir", nargs="?", help="campaign directory")
    p.add_argument("--out", metavar="FILE.html", help="default DIR/report.html")
    p.add_argument("--campaign", metavar="NAME", help="the campaign, where the ledger holds several")
    p.add_argument("--store", metavar="URL", help=store_help)
    p.set_defaults(func=cmd_report)
