"""A ledger with a campaign in every state the console shows, built with Ledger methods, and a
fake running campaign (an Applier thread) that carries commands out."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from orchestrator.console.auth import hash_password, new_token, token_hash
from orchestrator.control import Applier
from orchestrator.ledger import Ledger
from orchestrator.spec import load_campaign
from planners.base import Proposal

ROOT = Path(__file__).resolve().parents[1]
PASSWORDS = {"ada": "ada-operator-pw", "vic": "vic-viewer-pw", "root": "root-admin-pw"}
ROLES = {"ada": "operator", "vic": "viewer", "root": "admin"}


def build_campaign(ledger: Ledger, example: str = "branin.yaml", n_done: int = 6, waiting: int = 2,
                   name: str | None = None) -> int:
    """A campaign with ``n_done`` completed trials, one failed, one vetoed, one running and
    ``waiting`` proposals waiting for approval, plus two model versions."""
    spec = load_campaign(ROOT / "examples" / example)
    if name:
        spec = spec.model_copy(update={"name": name})
    cid, _ = ledger.open_campaign(spec.name, spec.model_dump(mode="json"), spec.seed)
    params = [p.name for p in spec.parameters]
    outcomes = spec.outcome_names

    def point(i: int) -> dict[str, float]:
        out = {}
        for j, p in enumerate(spec.parameters):
            lo, hi = float(p.lower), float(p.upper)
            out[p.name] = lo + (hi - lo) * (((i * 7 + j * 3) % 11) / 10)
        return out

    def propose(i: int, **kw: Any) -> int:
        return ledger.propose(cid, Proposal(parameters=point(i), planner="bo", seed=i,
                                            predicted_mean={o: 1.0 + i for o in outcomes},
                                            predicted_sd={o: 0.1 * (i + 1) for o in outcomes},
                                            acquisition_value=0.5 / (i + 1), model_version=f"gp-{min(i, 2)}",
                                            ood_score=0.3 * i, **kw))

    for i in range(n_done):
        tid = propose(i)
        ledger.transition(tid, "approved", "system", "passed the safety envelope")
        ledger.transition(tid, "running", "system", "dispatched", instrument=spec.instruments[0].name)
        ledger.complete(tid, {o: float(10 - i + k * ((i * 5) % 3)) for k, o in enumerate(outcomes)},
                        run_uid=f"run-{i}")
    tid = propose(n_done)
    ledger.transition(tid, "approved", "system", "ok")
    ledger.transition(tid, "running", "system", "dispatched", instrument=spec.instruments[0].name)
    ledger.transition(tid, "failed", "system", "the instrument timed out")
    tid = propose(n_done + 1)
    ledger.transition(tid, "vetoed", "system", f"{params[0]} outside the safety envelope")
    tid = propose(n_done + 2)
    ledger.transition(tid, "approved", "system", "ok")
    ledger.transition(tid, "running", "system", "dispatched", instrument=spec.instruments[0].name)
    for k in range(waiting):
        tid = propose(n_done + 3 + k)
        ledger.set_awaiting(tid, f"out-of-domain score {0.3 * (n_done + 3 + k):.1f} above 2.0")
    for v in (1, 2):
        ledger.record_model_version(cid, {
            "number": v, "label": f"gp-{v}", "kind": "gp", "n_points": 3 * v, "data_hash": f"h{v}",
            "metrics": {"rmse": 1.0 / v}, "path": f"models/gp-{v}",
            "calibration": {"results": 3 * v, "overall": {"count": 3 * v, "coverage_68": 0.6 + 0.05 * v,
                                                          "coverage_95": 0.9 + 0.02 * v, "nll": 1.5 / v}}})
    return cid


def add_users(ledger: Ledger) -> dict[str, str]:
    """The three users of PASSWORDS; returns a token per user."""
    tokens = {}
    for name, pw in PASSWORDS.items():
        ledger.add_user(name, ROLES[name], hash_password(pw))
        tok = new_token()
        ledger.add_token(name, token_hash(tok), "test")
        tokens[name] = tok
    return tokens


class FakeCampaign:
    """Just enough of a running campaign for the Applier (control.Campaign)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.paused = False
        self.backlog: list[int] = []
        self.stopped: str | None = None
        self.budget: dict[str, Any] | None = None

    def request_stop(self, reason: str) -> None:
        self.stopped = reason

    def abandon_trial(self, trial_id: int, reason: str) -> str | None:
        self.ledger.transition(trial_id, "abandoned", "operator", reason)
        return None

    def set_budget(self, budget: dict[str, Any]) -> None:
        self.budget = budget

    def tell_result(self, trial_id: int, values: dict[str, float] | None, failed: str | None) -> str | None:
        return None

    def check_point(self, parameters: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        return parameters, None


class RunningCampaign:
    """Holds the campaign's lock (so Control.live() is true) and applies commands on a thread."""

    def __init__(self, ledger: Ledger, cid: int, every: float = 0.05) -> None:
        self.ledger, self.cid, self.every = ledger, cid, every
        self.target = FakeCampaign(ledger)
        self.applier = Applier(ledger, cid, self.target)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.ledger.renew(self.cid, "me", 60, 1.0)
            self.applier.apply_pending()

    def __enter__(self) -> RunningCampaign:
        assert self.ledger.acquire(self.cid, "me", 60) is None
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.ledger.release(self.cid, "me")


def open_campaign_page(browser: Any, url: str, name: str, password: str, campaign_key: str,
                       **context_options: Any) -> tuple[Any, Any, list[str]]:
    """Log ``name`` in on the console's page in a fresh browser context and open a campaign;
    returns ``(context, page, errors)``, ``errors`` collecting the page's JavaScript errors."""
    from playwright.sync_api import expect

    context = browser.new_context(**context_options)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    expect(page.get_by_test_id("login")).to_be_visible()
    page.get_by_test_id("login-name").fill(name)
    page.get_by_test_id("login-password").fill(password)
    page.get_by_test_id("login-submit").click()
    page.get_by_test_id(f"campaign-link-{campaign_key}").click()
    return context, page, errors
