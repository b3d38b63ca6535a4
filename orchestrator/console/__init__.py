"""The operator's web console: a FastAPI app (REST under /api, a websocket per campaign, the
page at /) over one or more ledgers. See :func:`orchestrator.console.app.create_app`.

Campaign ids in URLs are ``"<ledger index>-<campaign id>"`` (``"0-1"``: the first ledger
given, its campaign 1), so campaigns of several ledgers never clash.
"""

from typing import Any

__all__ = ["check_bind", "create_app", "serve_in_thread"]


def __getattr__(name: str) -> Any:
    # Lazy: the command line imports orchestrator.console.commands to list its verbs, and checking a
    # campaign file must not load FastAPI and SQLAlchemy for that.
    if name in __all__:
        from orchestrator.console import app

        return getattr(app, name)
    raise AttributeError(name)
