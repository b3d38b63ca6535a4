"""The console's page in a real browser (Debian's chromium, headless): an operator approves a
waiting proposal and sees it leave the queue without a reload; a viewer sees no control buttons
and cannot POST with their cookie. (A browser test of a *running* campaign comes with the flow.)"""

from __future__ import annotations

import pytest

from orchestrator.console import create_app, serve_in_thread
from orchestrator.ledger import Ledger
from planners.base import Proposal
from tests.console_factories import (
    PASSWORDS,
    RunningCampaign,
    add_users,
    build_campaign,
    open_campaign_page,
)


@pytest.fixture
def console(tmp_path):
    led = Ledger.for_directory(tmp_path / "campaign")
    cid = build_campaign(led, n_done=5, waiting=2)
    add_users(led)
    app = create_app([led], led, auth_required=False, wait_seconds=3.0, poll_every=0.3)
    server = serve_in_thread(app, "127.0.0.1", 0)
    try:
        yield {"ledger": led, "cid": cid, "url": server.url}
    finally:
        server.stop()
        led.close()


def _login(browser, url: str, name: str):
    from playwright.sync_api import expect

    context, page, errors = open_campaign_page(browser, url, name, PASSWORDS[name], "0-1")
    expect(page.get_by_test_id("campaign-status")).to_contain_text("created")
    return context, page, errors


def test_operator_approves_and_the_row_leaves_the_queue_without_reload(browser, console, tmp_path):
    from playwright.sync_api import expect

    led, cid = console["ledger"], console["cid"]
    with RunningCampaign(led, cid):
        context, page, errors = _login(browser, console["url"], "ada")
        expect(page.get_by_test_id("live-indicator")).to_have_text("live")
        row = page.get_by_test_id("waiting-row-9")
        expect(row).to_be_visible()
        expect(page.get_by_test_id("ood-9")).to_have_text("2.400")
        expect(page.get_by_test_id("pause-button")).to_be_visible()
        page.evaluate("window.__notReloaded = true")
        page.get_by_test_id("approve-9").click()
        expect(row).to_have_count(0)
        expect(page.get_by_test_id("trial-row-9")).to_have_attribute("data-state", "approved")
        expect(page.get_by_test_id("message")).to_contain_text("trial 9 approved")
        last = led.commands(cid, limit=1)[0]
        assert (last.action, last.trial_number, last.user, last.via, last.status) == \
            ("approve", 9, "ada", "console", "applied")
        expect(page.locator("[data-testid^=audit-row-][data-action=approve]")).to_have_count(1)
        # a change made elsewhere (the campaign proposing) reaches the page over the websocket
        tid = led.propose(cid, Proposal(parameters={"x1": 1.0, "x2": 2.0}, planner="bo", seed=1, ood_score=3.1))
        led.set_awaiting(tid, "out-of-domain score 3.1 above 2.0")
        expect(page.get_by_test_id("waiting-row-11")).to_be_visible()
        assert page.evaluate("window.__notReloaded") is True
        page.screenshot(path=str(tmp_path / "console-operator.png"), full_page=True)
        assert not errors, errors
        context.close()


def test_viewer_sees_no_control_buttons_and_a_post_with_their_cookie_is_refused(browser, console, tmp_path):
    from playwright.sync_api import expect

    led, cid = console["ledger"], console["cid"]
    context, page, errors = _login(browser, console["url"], "vic")
    expect(page.get_by_test_id("waiting-row-9")).to_be_visible()
    expect(page.get_by_test_id("approve-9")).to_have_count(0)
    expect(page.get_by_test_id("reject-9")).to_have_count(0)
    expect(page.get_by_test_id("pause-button")).to_be_hidden()
    expect(page.get_by_test_id("stop-button")).to_be_hidden()
    status = page.evaluate("""async () => {
        const me = await (await fetch('/api/me')).json();
        const r = await fetch('/api/campaigns/0-1/trials/9/approve', {method: 'POST',
            headers: {'X-CSRF-Token': me.csrf_token, 'Content-Type': 'application/json'}, body: '{}'});
        return [r.status, (await r.json()).error];
    }""")
    assert status[0] == 403 and "viewer" in status[1]
    last = led.commands(cid, limit=1)[0]
    assert (last.action, last.user, last.status) == ("approve", "vic", "denied")
    page.screenshot(path=str(tmp_path / "console-viewer.png"), full_page=True)
    assert not errors, errors
    context.close()
