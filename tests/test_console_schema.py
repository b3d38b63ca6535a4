"""The console's OpenAPI schema holds: schemathesis generates requests for every operation (with
an admin token) and checks that none is a server error and every answer fits the schema; and
every POST route refuses a caller without credentials."""

from __future__ import annotations

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from orchestrator.console import create_app
from orchestrator.ledger import Ledger
from tests.console_factories import add_users, build_campaign

_led_dir: dict[str, object] = {}


def _app():
    import tempfile

    led = Ledger.for_directory(tempfile.mkdtemp(prefix="labpilot-console-schema-"))
    build_campaign(led, n_done=3, waiting=2)
    tokens = add_users(led)
    app = create_app([led], led, auth_required=True, wait_seconds=0.2)
    _led_dir.update(ledger=led, tokens=tokens)
    return app


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {_led_dir['tokens']['root']}"}
    if "{cid}" in case.path and case.path_parameters is not None and case.operation.method.upper() == "GET":
        # half the time a real campaign, so the 200 answers are checked too
        if hash(str(case.query)) % 2 == 0:
            case.path_parameters["cid"] = "0-1"
    response = case.call()
    case.validate_response(response, checks=(not_a_server_error, response_schema_conformance))


def test_every_post_route_without_credentials_is_401():
    client = TestClient(APP)
    spec = client.get("/openapi.json").json()
    posts = [p for p, ops in spec["paths"].items() if "post" in ops and p != "/api/login"]
    assert len(posts) >= 12
    for path in posts:
        url = path.replace("{cid}", "0-1").replace("{number}", "4")
        for body in (None, {}, "not json"):  # credentials are checked before the body is read
            r = client.post(url, json=body) if body != "not json" else client.post(url, content=b"{x")
            assert r.status_code == 401, (path, body, r.status_code, r.text)
