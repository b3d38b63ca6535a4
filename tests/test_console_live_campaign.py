"""The console's page in a real browser against a campaign that really runs (run_campaign in a
thread of this process, manual approval, the journaling reactor): the operator sees a proposal
appear, approves it, sees its result arrive and pauses the campaign, all without a reload; the
instrument's own journal shows nothing ran after the pause. A viewer sees no control buttons and
a POST with their cookie is refused and audited.

``LABPILOT_SAVE_SCREENSHOT=1`` also copies the operator's screenshot to docs/console.png."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from orchestrator.console import create_app, serve_in_thread
from orchestrator.console.auth import hash_password
from orchestrator.control import Actor, Control
from orchestrator.ledger import Ledger, sqlite_url
from tests.console_factories import open_campaign_page
from tests.test_control import Running, _write, runs, until, waiting

pytestmark = pytest.mark.usefixtures("prefect_api_url")

ROOT = Path(__file__).resolve().parents[1]
PASSWORDS = {"olga": "olga-operator-pw", "vera": "vera-viewer-pw"}
ROLES = {"olga": "operator", "vera": "viewer"}


@pytest.fixture
def live(tmp_path, journal, monkeypatch):
    """A running campaign (manual approval, 3 trials) and its console, as `labpilot run --console`."""
    monkeypatch.setenv("LABPILOT_TEST_LATENCY", "0.3")
    out = tmp_path / "run"
    run = Running(_write(tmp_path, trials=3, approval="{policy: manual}"), out)
    led = run.runtime.ledger
    for name, pw in PASSWORDS.items():
        led.add_user(name, ROLES[name], hash_password(pw))
    app = create_app([led], led, auth_required=True, live_source="listeners", wait_seconds=3.0, poll_every=0.3)
    server = serve_in_thread(app, "127.0.0.1", 0)
    try:
        yield {"run": run, "out": out, "ledger": led, "cid": run.runtime.campaign_id, "url": server.url,
               "key": f"0-{run.runtime.campaign_id}"}
    finally:
        if run.thread.is_alive():
            Control(Ledger(sqlite_url(out)), run.runtime.campaign_id).submit(
                "stop", Actor("olga", "operator", "cli"), reason="end of test")
        run.thread.join(60)
        server.stop()


def _login(browser, url: str, name: str, key: str):
    from playwright.sync_api import expect

    context, page, errors = open_campaign_page(browser, url, name, PASSWORDS[name], key,
                                               viewport={"width": 1280, "height": 1000})
    expect(page.get_by_test_id("campaign-status")).to_have_attribute("data-live", "true")
    expect(page.get_by_test_id("live-indicator")).to_have_text("live")
    return context, page, errors


def test_operator_steers_a_running_campaign_and_a_viewer_cannot(browser, live, journal, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    run, led, cid, key, out = live["run"], live["ledger"], live["cid"], live["key"], live["out"]
    context, page, errors = _login(browser, live["url"], "olga", key)
    page.evaluate("window.__notReloaded = true")

    # the campaign proposes; the proposal reaches the page over the websocket
    first = until(lambda: waiting(out), what="a proposal waiting for approval")[0]
    expect(page.get_by_test_id(f"waiting-row-{first.number}")).to_be_visible(timeout=5000)
    assert runs(journal) == []  # manual approval: nothing ran yet
    page.get_by_test_id(f"approve-{first.number}").click()
    # its result arrives without a reload
    row = page.get_by_test_id(f"trial-row-{first.number}")
    expect(row).to_have_attribute("data-state", "completed", timeout=10000)
    assert runs(journal) == [(first.parameters["x1"], first.parameters["x2"])]

    page.get_by_test_id("pause-button").click()
    status = page.get_by_test_id("campaign-status")
    expect(status).to_have_attribute("data-paused", "true")
    expect(status).to_contain_text("paused")
    expect(page.get_by_test_id("resume-button")).to_be_visible()
    expect(page.get_by_test_id("pause-button")).to_be_hidden()
    assert Ledger(sqlite_url(out)).campaign(cid).paused is True
    until(lambda: not led.trials(cid, ("running",)), what="the running trial ending")
    ran = len(runs(journal))
    # a proposal approved while paused waits in the backlog: nothing reaches the instrument
    second = next(iter(waiting(out)), None)
    if second is not None:
        expect(page.get_by_test_id(f"waiting-row-{second.number}")).to_be_visible()
        page.get_by_test_id(f"approve-{second.number}").click()
        expect(page.get_by_test_id(f"trial-row-{second.number}")).to_have_attribute("data-state", "approved")
    time.sleep(1.0)
    assert len(runs(journal)) == ran
    assert not led.trials(cid, ("running",))
    assert page.evaluate("window.__notReloaded") is True
    shot = tmp_path / "console-live.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("LABPILOT_SAVE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "console.png")
    assert not errors, errors
    context.close()

    # a viewer: no control buttons, and their cookie cannot pause
    context, page, errors = _login(browser, live["url"], "vera", key)
    expect(page.get_by_test_id("campaign-status")).to_have_attribute("data-paused", "true")
    expect(page.get_by_test_id("run-controls")).to_be_hidden()
    expect(page.get_by_test_id("pause-button")).to_be_hidden()
    expect(page.get_by_test_id("resume-button")).to_be_hidden()
    expect(page.get_by_test_id("stop-button")).to_be_hidden()
    expect(page.locator("[data-testid^=approve-]")).to_have_count(0)
    status = page.evaluate("""async (key) => {
        const me = await (await fetch('/api/me')).json();
        const r = await fetch(`/api/campaigns/${key}/pause`, {method: 'POST',
            headers: {'X-CSRF-Token': me.csrf_token, 'Content-Type': 'application/json'}, body: '{}'});
        return [r.status, (await r.json()).error];
    }""", key)
    assert status[0] == 403 and "viewer" in status[1], status
    last = led.commands(cid, limit=1)[0]
    assert (last.action, last.user, last.role, last.via, last.status) == ("pause", "vera", "viewer", "console", "denied")
    expect(page.locator("[data-testid^=audit-row-][data-action=pause][data-status=denied]")).to_have_count(1)
    assert not errors, errors
    context.close()

    # stop it; the thread ends
    Control(led, cid).submit("stop", Actor("olga", "operator", "cli"), reason="end of test")
    run.join(30)
    assert led.campaign(cid).status == "stopped"
    assert len(runs(journal)) == ran
