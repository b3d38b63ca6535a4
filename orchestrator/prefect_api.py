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

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_PR_SET_PDEATHSIG = 1


def _detach_and_die_with_parent() -> None:
    """In the server child, before it runs: a session of its own (a terminal's Ctrl-C goes to
    the foreground process group, and the campaign, not the server, must answer it: a server
    that died first left the campaign retrying a dead API for 74-98 s), and SIGTERM when the
    thread that started it ends (a SIGKILLed campaign left the server running with PPID 1)."""
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: no parent-death signal, the session still holds
        pass


def _server_class() -> Any:
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        """Prefect's temporary server, started as Prefect starts it (``_run_uvicorn_command`` of
        Prefect 3.8), but detached from the terminal and tied to this process's life."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            import prefect
            from prefect.settings import get_current_settings

            return subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                      "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                      "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1",
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                preexec_fn=_detach_and_die_with_parent,  # noqa: PLW1509 - no threads run in the child
            )

    return TiedServer


class PrefectAPI:
    """A handle on the Prefect API for this process: an existing URL or a background-started server."""

    def __init__(self) -> None:
        self.url: str | None = os.environ.get("PREFECT_API_URL") or None
        self.started_server = False
        self.seconds_to_ready = 0.0
        self._server = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._release = threading.Event()
        self._t0 = time.perf_counter()

    def start_in_background(self) -> PrefectAPI:
        if self.url:
            return self

        def boot() -> None:
            # This thread started the server and lives until stop(): the child's parent-death
            # signal follows the thread that forked it, not the process.
            server = None
            try:
                from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

                server = _server_class()()
                server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
                self._server = server
                self.url = server.api_url
                self.started_server = True
            except BaseException as exc:  # reported by wait()
                self._error = exc
            finally:
                self.seconds_to_ready = time.perf_counter() - self._t0
                self._ready.set()
            self._release.wait()
            if server is not None:
                server.stop()

        self._thread = threading.Thread(target=boot, name="prefect-server", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> str:
        """Block until the API is up; return its URL."""
        if self._thread is not None:
            self._ready.wait()
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
            self._ready.wait()
        self.stop()

    def stop(self) -> None:
        """Stop the server this process started (if any) and wait for it to go."""
        if self._thread is not None:
            self._release.set()
            if self._ready.is_set():
                self._thread.join(timeout=10)
        self._server = None
