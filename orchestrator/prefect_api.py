"""Which Prefect API a campaign talks to, started in the background so start-up overlaps other work.

Prefect 3's local mode has no in-process API: without ``PREFECT_API_URL`` it
starts a temporary server in a subprocess (measured here: 15-19 s cold, about
5-9 s warm). ``labpilot run`` starts that server on a thread at once, while
the planner, the models and the instruments are being imported and built,
and waits for it only when the flow begins. With ``PREFECT_API_URL`` set (a
long-running ``prefect server start``, or the test suite's shared server) no
server is started at all.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class PrefectAPI:
    """A handle on the Prefect API for this process: an existing URL or a background-started server."""

    def __init__(self) -> None:
        self.url: str | None = os.environ.get("PREFECT_API_URL") or None
        self.started_server = False
        self.seconds_to_ready = 0.0
        self._server = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()

    def start_in_background(self) -> PrefectAPI:
        if self.url:
            return self

        def boot() -> None:
            try:
                from prefect.server.api.server import SubprocessASGIServer
                from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

                server = SubprocessASGIServer()
                server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
                self._server = server
                self.url = server.api_url
                self.started_server = True
            except BaseException as exc:  # reported by wait()
                self._error = exc
            finally:
                self.seconds_to_ready = time.perf_counter() - self._t0

        self._thread = threading.Thread(target=boot, name="prefect-server-start", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> str:
        """Block until the API is up; return its URL."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(
                f"the local Prefect server did not start ({self._error}); raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a busy machine, or point "
                "PREFECT_API_URL at a running 'prefect server start'"
            ) from self._error
        assert self.url is not None
        return self.url

    @contextmanager
    def settings(self) -> Iterator[str]:
        """Prefect settings that point at this API for the duration of the block."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        url = self.wait()
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url

    def stop_when_ready(self) -> None:
        """Stop a server that is still starting (bad input: nothing will run)."""
        if self._thread is not None:
            self._thread.join()
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
