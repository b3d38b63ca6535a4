"""The console's REST API: auth (passwords, tokens, cookie sessions, CSRF, Origin), every read,
pagination, exports, control through the audit log, and JSON errors on bad input."""

from __future__ import annotations

import io
import time

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from orchestrator.console import check_bind, create_app
from orchestrator.console.auth import UnsafeBind
from orchestrator.ledger import Ledger
from tests.console_factories import PASSWORDS, RunningCampaign, add_users, build_campaign

CID = "0-1"
CONTROL_ROUTES = [
    ("pause", None), ("resume", None), ("stop", None), ("budget", {"max_trials": 40}),
    ("add", {"parameters": {"x1": 1.0, "x2": 2.0}}), ("import", {"rows": [{"x1": 1.0, "x2": 2.0, "y": 3.0}]}),
    ("trials/10/approve", None), ("trials/10/reject", {"reason": "too hot"}), ("trials/9/abandon", None),
    ("trials/7/requeue", None), ("trials/9/tell", {"values": {"y": 1.0}}),
    ("stations/reactor/retire", {"reason": "recalibration"}), ("stations/reactor/restore", None),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    led = Ledger.for_directory(tmp_path_factory.mktemp("console"))
    cid = build_campaign(led)
    tokens = add_users(led)
    app = create_app([led], led, auth_required=False, wait_seconds=3.0, poll_every=0.2)
    with TestClient(app) as client:
        yield {"ledger": led, "cid": cid, "tokens": tokens, "client": client, "app": app}
    led.close()


@pytest.fixture
def fresh(tmp_path):
    """A ledger of its own (for tests that change the campaign)."""
    led = Ledger.for_directory(tmp_path)
    cid = build_campaign(led, n_done=3, waiting=2)
    tokens = add_users(led)
    app = create_app([led], led, auth_required=False, wait_seconds=3.0)
    with TestClient(app) as client:
        yield {"ledger": led, "cid": cid, "tokens": tokens, "client": client}
    led.close()


def bearer(world, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world['tokens'][name]}"}


def login(client: TestClient, name: str) -> str:
    r = client.post("/api/login", json={"name": name, "password": PASSWORDS[name]})
    assert r.status_code == 200, r.text
    return r.json()["csrf_token"]


def is_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "field", "fix"} and body["error"], body
    return body


def denied(ledger: Ledger, cid: int) -> list:
    return [c for c in ledger.commands(cid, limit=10_000) if c.status == "denied"]


# ---- auth -------------------------------------------------------------------------------
def test_login_sets_an_httponly_strict_cookie_and_me_returns_the_csrf_token(world):
    c = TestClient(world["app"])
    r = c.post("/api/login", json={"name": "ada", "password": PASSWORDS["ada"]})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    me = c.get("/api/me").json()
    assert me["name"] == "ada" and me["role"] == "operator" and me["via"] == "cookie"
    assert me["csrf_token"] == r.json()["csrf_token"] and me["can_control"]
    assert c.post("/api/logout", headers={"X-CSRF-Token": me["csrf_token"]}).status_code == 200
    is_error(c.get("/api/campaigns"), 401)


def test_bad_password_and_unknown_user_are_refused_alike(world):
    c = TestClient(world["app"])
    a = is_error(c.post("/api/login", json={"name": "ada", "password": "nope-nope"}), 401)
    b = is_error(c.post("/api/login", json={"name": "nobody", "password": "nope-nope"}), 401)
    assert a["error"] == b["error"]
    is_error(c.get("/api/campaigns"), 401)


def test_token_reads_and_a_bad_token_is_401(world):
    c = world["client"]
    assert c.get("/api/campaigns", headers=bearer(world, "vic")).status_code == 200
    is_error(c.get("/api/campaigns", headers={"Authorization": "Bearer not-a-token"}), 401)
    is_error(c.get("/api/campaigns", headers={"Authorization": "Basic abc"}), 401)


def test_cookie_post_without_or_with_a_wrong_csrf_token_is_refused_and_audited(world):
    c = TestClient(world["app"])
    csrf = login(c, "ada")
    before = len(denied(world["ledger"], world["cid"]))
    is_error(c.post(f"/api/campaigns/{CID}/trials/10/approve"), 403)
    is_error(c.post(f"/api/campaigns/{CID}/trials/10/approve", headers={"X-CSRF-Token": csrf + "x"}), 403)
    assert len(denied(world["ledger"], world["cid"])) == before + 2
    is_error(c.post("/api/logout"), 403)


def test_cross_origin_requests_are_refused(world):
    c = TestClient(world["app"])
    csrf = login(c, "ada")
    evil = {"Origin": "http://evil.example", "X-CSRF-Token": csrf}
    is_error(c.post(f"/api/campaigns/{CID}/pause", headers=evil), 403)
    is_error(c.post(f"/api/campaigns/{CID}/pause", headers={**bearer(world, "ada"), "Origin": "http://evil.example"}), 403)
    is_error(c.post("/api/login", json={"name": "ada", "password": PASSWORDS["ada"]},
                    headers={"Origin": "http://evil.example"}), 403)
    assert c.get("/api/me", headers={"Origin": "http://testserver"}).status_code == 200


@pytest.mark.parametrize("route,body", CONTROL_ROUTES)
def test_anonymous_and_viewer_are_refused_on_every_control_route_and_audited(world, route, body):
    c, led = world["client"], world["ledger"]
    before = len(denied(led, world["cid"]))
    is_error(c.post(f"/api/campaigns/{CID}/{route}", json=body), 401)
    is_error(c.post(f"/api/campaigns/{CID}/{route}", json=body, headers={"Authorization": "Bearer forged"}), 401)
    is_error(c.post(f"/api/campaigns/{CID}/{route}", json=body, headers=bearer(world, "vic")), 403)
    viewer = TestClient(world["app"])
    csrf = login(viewer, "vic")
    is_error(viewer.post(f"/api/campaigns/{CID}/{route}", json=body, headers={"X-CSRF-Token": csrf}), 403)
    now = denied(led, world["cid"])
    assert len(now) == before + 4
    action = route.rsplit("/", 1)[-1]
    assert [d.action for d in now[:4]] == [action] * 4
    assert {d.user for d in now[:4]} == {"anonymous", "(bad credentials)", "vic"}


def test_non_loopback_bind_without_users_is_refused(tmp_path, world):
    empty = Ledger.for_directory(tmp_path)
    with pytest.raises(UnsafeBind, match="labpilot user add"):
        check_bind("0.0.0.0", empty)
    check_bind("127.0.0.1", empty)
    check_bind("::1", empty)
    check_bind("0.0.0.0", world["ledger"])  # users exist: fine
    empty.close()


def test_without_users_reads_are_anonymous_but_control_is_not(tmp_path):
    led = Ledger.for_directory(tmp_path)
    build_campaign(led, n_done=2, waiting=1)
    c = TestClient(create_app([led], led, auth_required=False))
    assert c.get("/api/me").json()["auth_required"] is False
    assert c.get(f"/api/campaigns/{CID}/trials").status_code == 200
    is_error(c.post(f"/api/campaigns/{CID}/pause"), 401)
    assert denied(led, 1)[0].user == "anonymous"
    c2 = TestClient(create_app([led], led, auth_required=True))
    is_error(c2.get("/api/campaigns"), 401)
    led.close()


# ---- reads ----------------------------------------------------------------------------------
def test_every_read_endpoint(world):
    c, h = world["client"], bearer(world, "vic")
    camps = c.get("/api/campaigns", headers=h).json()
    assert [x["id"] for x in camps] == [CID]
    one = c.get(f"/api/campaigns/{CID}", headers=h).json()
    assert one["name"] == "branin-demo" and one["budget"]["max_trials"] == 30
    assert one["budget"]["trials_done"] == 7 and one["waiting"] == 2 and one["counts"]["completed"] == 6
    assert one["best"]["value"] == 5.0 and one["live"] is False
    t = c.get(f"/api/campaigns/{CID}/trials/1", headers=h).json()
    assert [e["to_state"] for e in t["events"]] == ["proposed", "approved", "running", "completed"]
    assert t["proposal"]["planner"] == "bo" and t["outcomes"] == {"y": 10.0}
    obs = c.get(f"/api/campaigns/{CID}/observations", headers=h).json()
    assert [o["trial"] for o in obs] == [1, 2, 3, 4, 5, 6]
    props = c.get(f"/api/campaigns/{CID}/proposals", headers=h).json()
    assert props["total"] >= 11 and {"predicted_mean", "predicted_sd", "acquisition_value", "model_version",
                                     "ood_score"} <= set(props["items"][0])
    waiting = c.get(f"/api/campaigns/{CID}/waiting", headers=h).json()
    assert [w["trial"] for w in waiting] == [10, 11] and waiting[0]["proposal"]["ood_score"] > 2
    models = c.get(f"/api/campaigns/{CID}/models", headers=h).json()
    assert [m["number"] for m in models] == [1, 2] and "coverage_95" in models[0]["calibration"]["overall"]
    inst = c.get(f"/api/campaigns/{CID}/instruments", headers=h).json()
    assert inst == [inst[0]] and inst[0]["instrument"] == "reactor" and inst[0]["trial"] == 9
    fig = c.get(f"/api/campaigns/{CID}/figures", headers=h).json()
    assert fig["best_so_far"][-1] == 5.0 and fig["calibration"]["coverage_95"] == pytest.approx([0.92, 0.94])
    audit = c.get(f"/api/campaigns/{CID}/audit", headers=h).json()
    assert {"total", "items"} <= set(audit)
    is_error(c.get("/api/campaigns/0-99", headers=h), 404)
    is_error(c.get("/api/campaigns/nonsense", headers=h), 404)
    is_error(c.get(f"/api/campaigns/{CID}/trials/999", headers=h), 404)
    assert c.get("/").status_code == 200 and "login-form" in c.get("/").text
    assert c.get("/static/vendor/plotly.min.js").status_code == 200


def test_stations_say_what_runs_what_is_out_of_rotation_and_what_an_interlock_holds(fresh):
    led, cid, c = fresh["ledger"], fresh["cid"], fresh["client"]
    h = bearer(fresh, "vic")
    first = c.get(f"/api/campaigns/{CID}/stations", headers=h).json()
    assert [(s["station"], s["in_rotation"], s["trial"], s["held"]) for s in first] == [("reactor", True, 6, None)]
    led.set_rotation(cid, "reactor", False, "system", "3 trials failed in a row on it")
    led.record_suspension(cid, "reactor", "chiller:T", "10 <= value <= 80", 93.5, None)
    (st,) = c.get(f"/api/campaigns/{CID}/stations", headers=h).json()
    assert st["in_rotation"] is False and st["out_reason"] == "3 trials failed in a row on it"
    assert st["out_by"] == "system" and st["out_since"]
    assert st["held"]["pv"] == "chiller:T" and st["held"]["value"] == 93.5 and st["held"]["allowed"]
    led.set_rotation(cid, "reactor", True, "operator", "repaired", user="olga")
    (st,) = c.get(f"/api/campaigns/{CID}/stations", headers=h).json()
    assert st["in_rotation"] is True and st["out_reason"] is None


def test_trials_filter_by_state_and_paginate(world):
    c, h = world["client"], bearer(world, "vic")
    page = c.get(f"/api/campaigns/{CID}/trials?limit=3&offset=3", headers=h).json()
    assert page["total"] == 11 and [t["number"] for t in page["items"]] == [4, 5, 6]
    last = c.get(f"/api/campaigns/{CID}/trials?limit=3&offset=9", headers=h).json()
    assert [t["number"] for t in last["items"]] == [10, 11]
    done = c.get(f"/api/campaigns/{CID}/trials?state=completed&state=failed", headers=h).json()
    assert done["total"] == 7 and {t["state"] for t in done["items"]} == {"completed", "failed"}
    body = is_error(c.get(f"/api/campaigns/{CID}/trials?state=bogus", headers=h), 422)
    assert body["field"] == "state.0"
    assert is_error(c.get(f"/api/campaigns/{CID}/trials?limit=0", headers=h), 422)["field"] == "limit"
    audit = c.get(f"/api/campaigns/{CID}/audit?limit=1&offset=0", headers=h).json()
    assert len(audit["items"]) <= 1


def test_exports_parse_back(world):
    c, h = world["client"], bearer(world, "vic")
    r = c.get(f"/api/campaigns/{CID}/export.csv", headers=h)
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    csv = pd.read_csv(io.StringIO(r.text))
    assert len(csv) == 11 and {"trial", "state", "param.x1", "outcome.y"} <= set(csv.columns)
    r = c.get(f"/api/campaigns/{CID}/export.parquet", headers=h)
    pq = pd.read_parquet(io.BytesIO(r.content))
    assert list(pq["trial"]) == list(csv["trial"])


# ---- control --------------------------------------------------------------------------------------
def test_control_action_answers_with_the_commands_outcome(fresh):
    c, led, h = fresh["client"], fresh["ledger"], bearer(fresh, "ada")
    r = c.post(f"/api/campaigns/{CID}/pause", headers=h)  # nobody runs it: written, pending
    assert r.status_code == 202 and r.json()["status"] == "pending"
    with RunningCampaign(led, fresh["cid"]):
        t0 = time.monotonic()
        r = c.post(f"/api/campaigns/{CID}/trials/7/approve", headers=h, json={"reason": "looks fine"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "applied" and r.json()["outcome"] == "trial 7 approved"
        assert time.monotonic() - t0 < 3
        r = c.post(f"/api/campaigns/{CID}/trials/8/reject", headers=h, json={"reason": "too hot"})
        assert r.status_code == 200 and r.json()["outcome"] == "trial 8 rejected"
        body = is_error(c.post(f"/api/campaigns/{CID}/trials/8/approve", headers=h), 409)
        assert "not waiting for approval" in body["error"]
        r = c.post(f"/api/campaigns/{CID}/budget", headers=h, json={"max_trials": 12})
        assert r.status_code == 200 and "max_trials=12" in r.json()["outcome"]
    states = {t.number: t.state for t in led.trials(fresh["cid"])}
    assert states[7] == "approved" and states[8] == "rejected"
    log = c.get(f"/api/campaigns/{CID}/audit", headers=h).json()["items"]
    assert [x["action"] for x in log[:4]] == ["budget", "approve", "reject", "approve"]
    assert log[1]["user"] == "ada" and log[1]["via"] == "api" and log[1]["status"] == "refused"


def test_cookie_session_with_csrf_can_control(fresh):
    c = fresh["client"]
    csrf = login(c, "ada")
    r = c.post(f"/api/campaigns/{CID}/trials/7/approve", headers={"X-CSRF-Token": csrf, "Origin": "http://testserver"})
    assert r.status_code == 202 and r.json()["via"] == "console"


def test_malformed_json_and_wrong_types_are_422_naming_the_field(world):
    c, h = world["client"], bearer(world, "ada")
    body = is_error(c.post(f"/api/campaigns/{CID}/budget", headers={**h, "Content-Type": "application/json"},
                           content=b"{not json"), 422)
    assert body["field"] == "body" and "JSON" in body["error"]
    assert is_error(c.post(f"/api/campaigns/{CID}/budget", headers=h, json={"max_trials": "many"}), 422)["field"] == "max_trials"
    assert is_error(c.post(f"/api/campaigns/{CID}/budget", headers=h, json={"max_trials": 0}), 422)["field"] == "max_trials"
    assert is_error(c.post(f"/api/campaigns/{CID}/budget", headers=h, json={"bogus": 1}), 422)["field"] == "bogus"
    assert is_error(c.post(f"/api/campaigns/{CID}/trials/10/reject", headers=h, json={}), 422)["field"] == "reason"
    assert is_error(c.post(f"/api/campaigns/{CID}/trials/0/approve", headers=h), 422)["field"] == "number"
    assert is_error(c.post(f"/api/campaigns/{CID}/trials/99999999999999/approve", headers=h), 422)["field"] == "number"
    assert is_error(c.post("/api/login", json={"name": 3}), 422)["field"] in ("name", "password")
    is_error(c.post(f"/api/campaigns/{CID}/trials/999/approve", headers=h), 404)


def test_websocket_relays_ledger_changes(fresh):
    c, led = fresh["client"], fresh["ledger"]
    with c.websocket_connect(f"/api/campaigns/{CID}/live", headers=bearer(fresh, "vic")) as ws:
        assert ws.receive_json()["topic"] == "hello"
        time.sleep(0.8)  # the feed's first poll takes its baseline
        led.set_awaiting(led.trials(fresh["cid"], ("proposed",))[0].id, None)
        msg = ws.receive_json()
        assert msg["topic"] == "ledger" and "trials" in msg["body"]["changed"]
    with pytest.raises(Exception):  # noqa: B017 - the handshake is refused
        with c.websocket_connect(f"/api/campaigns/{CID}/live", headers={**bearer(fresh, "vic"),
                                                                       "Origin": "http://evil.example"}) as ws:
            ws.receive_json()
    anon = TestClient(c.app)
    with pytest.raises(Exception):  # noqa: B017
        with anon.websocket_connect(f"/api/campaigns/{CID}/live") as ws:
            ws.receive_json()


def test_cli_user_add_token_console_refusal(tmp_path, monkeypatch, capsys):
    import argparse
    import sys

    from orchestrator.console.commands import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        a = parser.parse_args(list(argv))
        return a.func(a)

    assert run("console", str(tmp_path / "nowhere"), "--host", "0.0.0.0") == 2
    led = Ledger.for_directory(tmp_path)
    build_campaign(led, n_done=1, waiting=0)
    led.close()
    assert run("console", str(tmp_path), "--host", "0.0.0.0") == 2
    assert "no user exists" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert run("user", "add", "bob", str(tmp_path), "--role", "operator", "--password-stdin") == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("a-long-password\n"))
    assert run("user", "add", "bob", str(tmp_path), "--role", "operator", "--password-stdin") == 0
    capsys.readouterr()
    assert run("user", "token", "bob", str(tmp_path)) == 0
    token = capsys.readouterr().out.strip()
    assert run("user", "token", "nobody", str(tmp_path)) == 2
    led = Ledger.for_directory(tmp_path)
    c = TestClient(create_app([led], led, auth_required=False))
    assert c.get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()["name"] == "bob"
    assert c.post("/api/login", json={"name": "bob", "password": "a-long-password"}).status_code == 200
    led.close()


def test_in_process_listeners_feed_the_websocket_at_once(tmp_path):
    led = Ledger.for_directory(tmp_path)
    cid = build_campaign(led, n_done=1, waiting=1)
    app = create_app([led], led, auth_required=False, live_source="listeners", poll_every=30)
    with TestClient(app) as c:
        with c.websocket_connect(f"/api/campaigns/{CID}/live") as ws:
            assert ws.receive_json()["topic"] == "hello"
            tid = led.trials(cid, ("proposed",))[0].id
            led.set_awaiting(tid, None)
            led.transition(tid, "approved", "operator", "ok")
            msg = ws.receive_json()
            assert (msg["topic"], msg["via"], msg["body"]["state"]) == ("trial", "ledger", "approved")
    assert led.listeners == []  # the app's listener leaves with it
    led.close()
