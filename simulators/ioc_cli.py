"""``labpilot ioc PROBLEM [--prefix P] [--port N]``: serve a simulator problem as an EPICS IOC
on 127.0.0.1 (see :mod:`simulators.ioc`), to try a ``kind: epics`` campaign without hardware."""

from __future__ import annotations

import argparse


def cmd_ioc(args: argparse.Namespace) -> int:
    from simulators.ioc import run_from_args

    try:
        return run_from_args(args)
    except KeyboardInterrupt:
        return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``ioc`` to the ``labpilot`` subcommands."""
    from simulators.ioc import add_arguments

    p = sub.add_parser("ioc", help="serve a simulator problem as an EPICS IOC on 127.0.0.1 (Channel Access)")
    add_arguments(p)
    p.set_defaults(func=cmd_ioc)
