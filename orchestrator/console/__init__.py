"""The operator's web console: a FastAPI app (REST under /api, a websocket per campaign, the
page at /) over one or more ledgers. See :func:`orchestrator.console.app.create_app`.

Campaign ids in URLs are ``"<ledger index>-<campaign id>"`` (``"0-1"``: the first ledger
given, its campaign 1), so campaigns of several ledgers never clash.
"""

from orchestrator.console.app import check_bind, create_app, serve_in_thread

__all__ = ["check_bind", "create_app", "serve_in_thread"]
