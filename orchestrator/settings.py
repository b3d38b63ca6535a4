"""Settings, overridable from the environment with the ``LABPILOT_`` prefix."""

from __future__ import annotations

import os
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LABPILOT_")

    runs_dir: str = "runs"
    ledger_url: str | None = None
    prefect_startup_timeout: int = 90
    log_level: str = "WARNING"
    #: where publishers send (a proxy's in side) and subscribers listen (its out side); both
    #: unset: ``labpilot run`` starts its own proxy on loopback, on free ports
    stream_publish: str | None = None
    stream_subscribe: str | None = None
    #: the surrogate trainer: ``inprocess`` (in ``labpilot run``), ``external`` (``labpilot
    #: trainer DIR`` elsewhere; the run only follows its model versions) or ``off``
    trainer: Literal["inprocess", "external", "off"] = "inprocess"
    #: results from which the deep ensemble replaces the exact GP
    surrogate_switch_at: int = 1000
    #: seconds a planner waits for the model version trained on every result so far (so a
    #: campaign's decisions do not depend on the trainer's speed); 0: never wait
    trainer_wait: float = 30.0


def configure_prefect_environment(settings: Settings | None = None) -> None:
    """Quiet, offline, patient Prefect defaults, set before Prefect is imported.

    Analytics would try to reach the internet; on a loaded 2-core machine the
    temporary server's 20 s start-up limit can run out. A user's own values win.
    """
    s = settings or Settings()
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(s.prefect_startup_timeout),
        "PREFECT_LOGGING_LEVEL": s.log_level,
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
