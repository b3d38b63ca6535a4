"""The console's FastAPI app: REST under ``/api``, a websocket per campaign, the page at ``/``.

Campaign ids in URLs are ``"<ledger index>-<campaign id>"``: ``"0-3"`` is campaign 3 of the
first ledger given to :func:`create_app`, so the campaigns of several ledgers never clash.

Every error is JSON ``{"error", "field", "fix"}``. Control endpoints write the command to the
ledger (``Control.submit``), wait up to ``wait_seconds`` for the running campaign to carry it
out, and answer with the command: 200 applied, 202 still pending (the campaign is not running
now: it is carried out when the campaign resumes), 409 refused (the reason in ``error``).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, WebSocket
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect

from orchestrator.console import schemas as S
from orchestrator.console.auth import (
    COOKIE,
    Authenticator,
    AuthError,
    Principal,
    check_bind,
    csrf_ok,
    origin_ok,
)
from orchestrator.console.figures import best_of, figure_data
from orchestrator.console.live import Client, LiveHub
from orchestrator.control import CONTROL_ROLES, Actor, Control, ControlError, campaign_is_live
from orchestrator.ledger import CampaignRow, CommandRow, Ledger, TrialRow

log = logging.getLogger("labpilot.console")
STATIC = Path(__file__).parent / "static"
_CID = re.compile(r"^(\d{1,4})-(\d{1,12})$")
MAX_PAGE = 1000
TrialNumber = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="the trial's number in its campaign")]

__all__ = ["check_bind", "create_app", "serve_in_thread"]


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None, fix: str | None = None,
                 command: CommandRow | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.field, self.fix, self.command = status, error, field, fix, command


def _error(status: int, error: str, field: str | None = None, fix: str | None = None,
           command: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "field": field, "fix": fix, "command": command}, status_code=status,
                        headers=headers)


def _command_out(c: CommandRow) -> dict[str, Any]:
    return S.CommandOut(id=c.id, at=c.at, user=c.user, role=c.role, via=c.via, action=c.action,
                        trial=c.trial_number, args=c.args or {}, reason=c.reason or "", status=c.status,
                        outcome=c.outcome or "", applied_at=c.applied_at).model_dump(mode="json")


_ERRORS = {code: {"model": S.ErrorOut} for code in (400, 401, 403, 404, 409, 422)}


@dataclass
class _Camp:
    key: str
    index: int
    ledger: Ledger
    row: CampaignRow


class Console:
    """What the app serves: the ledgers, the users, the sessions and the live feeds."""

    def __init__(self, ledgers: list[Ledger], users: Ledger, auth_required: bool, wait_seconds: float,
                 hub: LiveHub) -> None:
        self.ledgers, self.users = list(ledgers), users
        self.auth = Authenticator(users, auth_required)
        self.wait_seconds = wait_seconds
        self.hub = hub
        self._specs: dict[tuple[str, int], Any] = {}

    # ---- campaigns ------------------------------------------------------------------
    def campaigns(self) -> list[_Camp]:
        return [_Camp(f"{i}-{c.id}", i, led, c) for i, led in enumerate(self.ledgers) for c in led.campaigns()]

    def campaign(self, key: str) -> _Camp:
        m = _CID.match(key)
        if m:
            i, cid = int(m.group(1)), int(m.group(2))
            if i < len(self.ledgers):
                for c in self.ledgers[i].campaigns():
                    if c.id == cid:
                        return _Camp(key, i, self.ledgers[i], c)
        raise ApiError(404, f"no campaign {key!r}", "cid",
                       "GET /api/campaigns lists them; ids are '<ledger index>-<campaign id>', e.g. '0-1'")

    def spec(self, camp: _Camp) -> Any:
        from orchestrator.spec import CampaignSpec

        cache_key = (camp.key, hash(repr(camp.row.spec)))
        spec = self._specs.get(cache_key)
        if spec is None:
            spec = self._specs[cache_key] = CampaignSpec.model_validate(camp.row.spec)
        return spec

    # ---- who asks ---------------------------------------------------------------------
    def principal(self, request: Request) -> Principal:
        try:
            return self.auth.resolve(request.headers.get("authorization"), request.cookies.get(COOKIE))
        except AuthError as exc:
            raise ApiError(exc.status, exc.error, "Authorization", exc.fix) from None

    def reader(self, request: Request) -> Principal:
        p = self.principal(request)
        if p.anonymous and self.auth.configured():
            raise ApiError(401, "log in first", None, "POST /api/login {name, password}, or send "
                                                      "'Authorization: Bearer TOKEN'")
        return p

    def writer_checks(self, request: Request, p: Principal) -> None:
        """Origin and CSRF for a state-changing request made with the cookie."""
        if not origin_ok(request.headers.get("origin"), request.headers.get("host")):
            raise ApiError(403, f"cross-origin request refused (Origin {request.headers.get('origin')!r})",
                           "Origin", "use the console's own page")
        if not csrf_ok(p, request.headers.get("x-csrf-token")):
            raise ApiError(403, "missing or wrong CSRF token", "X-CSRF-Token",
                           "send the csrf_token from POST /api/login or GET /api/me as X-CSRF-Token")


def _trial_out(t: TrialRow, detail: bool = False) -> dict[str, Any]:
    d = dict(number=t.number, state=t.state, parameters=t.parameters or {},
             outcomes=dict(t.observation.values) if t.observation is not None else None,
             instrument=t.instrument, awaiting=t.awaiting, wait_deadline=t.wait_deadline, source=t.source,
             reason=t.reason, created_at=t.created_at, started_at=t.started_at, finished_at=t.finished_at)
    if detail:
        d["events"] = [S.EventOut(from_state=e.from_state, to_state=e.to_state, at=e.at, actor=e.actor,
                                  reason=e.reason or "") for e in t.events]
        d["proposal"] = _proposal_out(t)
        return S.TrialDetail(**d).model_dump(mode="json")
    return S.TrialOut(**d).model_dump(mode="json")


def _proposal_out(t: TrialRow) -> S.ProposalOut | None:
    p = t.proposal
    if p is None:
        return None
    return S.ProposalOut(trial=t.number, planner=p.planner, model_version=p.model_version,
                         predicted_mean=p.predicted_mean or {}, predicted_sd=p.predicted_sd or {},
                         acquisition_value=p.acquisition_value, ood_score=p.ood_score,
                         model_unseen=p.model_unseen, proposed_parameters=p.parameters, at=p.at)


def _param_out(p: Any) -> S.ParameterOut:
    return S.ParameterOut(name=p.name, type=p.type, low=getattr(p, "lower", None), high=getattr(p, "upper", None),
                          choices=getattr(p, "choices", None))


def _budget(camp: _Camp, spec: Any) -> S.BudgetOut:
    over = camp.row.budget_override or {}
    if isinstance(over.get("budget"), dict):
        over = over["budget"]
    max_trials = over.get("max_trials") or spec.budget.max_trials
    max_wall = over.get("max_wall_time") or spec.budget.max_wall_time
    return S.BudgetOut(max_trials=int(max_trials), max_wall_time=max_wall,
                       trials_done=camp.ledger.runs_done(camp.row.id), wall_seconds=float(camp.row.wall_seconds or 0),
                       override=camp.row.budget_override)


def _summary(camp: _Camp) -> dict[str, Any]:
    r = camp.row
    return dict(id=camp.key, name=r.name, status=r.status, paused=bool(r.paused), live=campaign_is_live(r),
                counts=camp.ledger.counts(r.id), created_at=r.created_at)


def create_app(ledgers: list[Ledger], users_ledger: Ledger, *, auth_required: bool,
               live_source: Literal["stream", "listeners"] = "stream", wait_seconds: float = 5.0,
               poll_every: float = 0.5) -> FastAPI:
    """The console over every campaign of ``ledgers``; users and tokens come from ``users_ledger``.

    ``auth_required``: every read needs a logged-in user even when no user exists yet (with users,
    reads always need one). ``live_source="listeners"`` (``labpilot run --console``): the app
    hooks each ledger's ``Ledger.listeners`` in this process and relays every change at once,
    instead of subscribing to the campaigns' streams; the ledger is polled as a fallback either way.
    The caller serving on a network address calls :func:`check_bind` first.
    """
    hub = LiveHub(poll_every=poll_every, use_stream=live_source == "stream")
    console = Console(ledgers, users_ledger, auth_required, wait_seconds, hub)
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        hub.stop()
        for led, listener in getattr(_app.state, "console_listeners", []):
            if listener in led.listeners:
                led.listeners.remove(listener)

    app = FastAPI(title="labpilot console", version="1", lifespan=lifespan,
                  description="Watch and steer labpilot campaigns. Campaign ids are '<ledger index>-<campaign id>'.")
    app.state.console = console
    if live_source == "listeners":
        for i, led in enumerate(ledgers):
            listener = hub.listener(lambda cid, i=i: f"{i}-{cid}")
            led.listeners.append(listener)
            app.state.console_listeners = [*getattr(app.state, "console_listeners", []), (led, listener)]

    # ---- errors: always JSON {error, field, fix} ----------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.field, exc.fix,
                      _command_out(exc.command) if exc.command is not None else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(x) for x in first.get("loc", ())]
        where = loc[0] if loc else "body"
        field = ".".join(loc[1:]) or where
        if first.get("type") == "json_invalid":
            return _error(422, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                          "body", "send a JSON object, with Content-Type: application/json")
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return _error(422, f"{field}: {first.get('msg')}{more}", field,
                      "see /docs for what this endpoint takes")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), None,
                      "see /docs for the endpoints" if exc.status_code in (404, 405) else None,
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("console: request failed")
        return _error(500, f"internal error: {type(exc).__name__}", None, "the console's log has the trace")

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        # plotly's WebGL traces (parallel coordinates) compile shaders through Function(): 'unsafe-eval'
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; script-src 'self' 'unsafe-eval'; "
                                    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
                                    "connect-src 'self'; frame-ancestors 'none'")
        if request.url.path.startswith("/api"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    api = APIRouter(prefix="/api", responses=_ERRORS)

    # ---- auth -------------------------------------------------------------------------
    def _me(p: Principal) -> dict[str, Any]:
        return S.MeOut(name=p.name, role=p.role, via=p.via, csrf_token=p.csrf,
                       auth_required=console.auth.configured(),
                       can_control=p.role in CONTROL_ROLES).model_dump(mode="json")

    @api.post("/login", response_model=S.MeOut, tags=["auth"])
    def login(body: S.LoginIn, request: Request, response: Response) -> Any:
        if not origin_ok(request.headers.get("origin"), request.headers.get("host")):
            raise ApiError(403, "cross-origin login refused", "Origin", "log in on the console's own page")
        try:
            p, sid = console.auth.login(body.name, body.password)
        except AuthError as exc:
            raise ApiError(exc.status, exc.error, "password", exc.fix) from None
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https", max_age=int(console.auth.sessions.lifetime))
        return _me(p)

    @api.post("/logout", response_model=S.OkOut, tags=["auth"])
    def logout(request: Request, response: Response) -> Any:
        p = console.principal(request)
        if p.anonymous:
            raise ApiError(401, "not logged in", None, "nothing to log out of")
        console.writer_checks(request, p)
        if p.session:
            console.auth.sessions.end(p.session)
        response.delete_cookie(COOKIE, path="/")
        return {"ok": True}

    @api.get("/me", response_model=S.MeOut, tags=["auth"])
    def me(request: Request) -> Any:
        return _me(console.principal(request))

    # ---- reads ------------------------------------------------------------------------
    @api.get("/campaigns", response_model=list[S.CampaignSummary], tags=["campaigns"])
    def campaigns(request: Request) -> Any:
        console.reader(request)
        return [_summary(c) for c in console.campaigns()]

    @api.get("/campaigns/{cid}", response_model=S.CampaignOut, tags=["campaigns"])
    def campaign(cid: str, request: Request) -> Any:
        console.reader(request)
        camp = console.campaign(cid)
        spec = console.spec(camp)
        waiting = sum(1 for t in camp.ledger.trials(camp.row.id, ("proposed",)) if t.awaiting)
        best = best_of(figure_data(camp.ledger, camp.row.id, spec)) if len(spec.objectives) == 1 else None
        return S.CampaignOut(
            **_summary(camp), description=spec.description, stop_reason=camp.row.stop_reason,
            finished_at=camp.row.finished_at, budget=_budget(camp, spec),
            parameters=[_param_out(p) for p in spec.parameters],
            objectives=[S.ObjectiveOut(name=o.name, goal=o.goal, target=o.target) for o in spec.objectives],
            outcomes=spec.outcome_names, approval_policy=spec.approval.policy,
            stream_address=camp.row.stream_address, waiting=waiting, best=best).model_dump(mode="json")

    @api.get("/campaigns/{cid}/trials", response_model=S.TrialPage, tags=["trials"])
    def trials(cid: str, request: Request, state: Annotated[list[S.State] | None, Query()] = None,
               limit: int = Query(100, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=10**9)) -> Any:
        console.reader(request)
        camp = console.campaign(cid)
        rows = camp.ledger.trials(camp.row.id, tuple(state) if state else None)
        return {"total": len(rows), "limit": limit, "offset": offset,
                "items": [_trial_out(t) for t in rows[offset:offset + limit]]}

    def _find_trial(camp: _Camp, number: int) -> TrialRow:
        t = camp.ledger.trial_by_number(camp.row.id, number)
        if t is None:
            raise ApiError(404, f"campaign {camp.key} has no trial {number}", "number",
                           f"GET /api/campaigns/{camp.key}/trials lists them")
        return t

    @api.get("/campaigns/{cid}/trials/{number}", response_model=S.TrialDetail, tags=["trials"])
    def trial(cid: str, number: TrialNumber, request: Request) -> Any:
        console.reader(request)
        return _trial_out(_find_trial(console.campaign(cid), number), detail=True)

    @api.get("/campaigns/{cid}/observations", response_model=list[S.ObservationOut], tags=["trials"])
    def observations(cid: str, request: Request) -> Any:
        console.reader(request)
        camp = console.campaign(cid)
        return [S.ObservationOut(trial=t.number, values=t.observation.values, units=t.observation.units or {},
                                 at=t.observation.at).model_dump(mode="json")
                for t in camp.ledger.trials(camp.row.id) if t.observation is not None]

    @api.get("/campaigns/{cid}/proposals", response_model=S.ProposalPage, tags=["trials"])
    def proposals(cid: str, request: Request, limit: int = Query(100, ge=1, le=MAX_PAGE),
                  offset: int = Query(0, ge=0, le=10**9)) -> Any:
        console.reader(request)
        camp = console.campaign(cid)
        rows = [t for t in camp.ledger.trials(camp.row.id) if t.proposal is not None]
        return {"total": len(rows), "limit": limit, "offset": offset,
                "items": [_proposal_out(t).model_dump(mode="json") for t in rows[offset:offset + limit]]}

    @api.get("/campaigns/{cid}/waiting", response_model=list[S.WaitingOut], tags=["trials"])
    def waiting(cid: str, request: Request) -> Any:
        console.reader(request)
        camp = console.campaign(cid)
        return [S.WaitingOut(trial=t.number, parameters=t.parameters, awaiting=t.awaiting,
                             wait_deadline=t.wait_deadline, proposal=_proposal_out(t)).model_dump(mode="json")
                for t in camp.ledger.trials(camp.row.id, ("proposed",)) if t.awaiting]

    @api.get("/campaigns/{cid}/instruments", response_model=list[S.InstrumentOut], tags=["trials"])
    def instruments(cid: str, request: Request) -> Any:
        console.reader(request)
        camp = console.campaign(cid)
        return [S.InstrumentOut(instrument=t.instrument or "?", trial=t.number, state=t.state,
                                parameters=t.parameters, since=t.started_at).model_dump(mode="json")
                for t in camp.ledger.trials(camp.row.id, ("running",))]

    @api.get("/campaigns/{cid}/stations", response_model=list[S.StationOut], tags=["trials"])
    def stations(cid: str, request: Request) -> Any:
        """Every station: its running trial, whether it is out of rotation, an interlock holding it."""
        console.reader(request)
        camp = console.campaign(cid)
        spec = console.spec(camp)
        running = {t.instrument: t for t in camp.ledger.trials(camp.row.id, ("running",))}
        out = camp.ledger.out_of_rotation(camp.row.id)
        held = {h.instrument: h for h in camp.ledger.suspensions(camp.row.id) if h.resumed_at is None}
        rows = []
        for inst in spec.instruments:
            for station in inst.stations:
                t, e, h = running.get(station), out.get(station), held.get(station)
                rows.append(S.StationOut(
                    station=station, instrument=inst.name, in_rotation=e is None,
                    out_reason=e.reason if e else None, out_since=e.at if e else None,
                    out_by=(f"{e.user} ({e.actor})" if e.user else e.actor) if e else None,
                    trial=t.number if t else None, parameters=t.parameters if t else {},
                    running_since=t.started_at if t else None,
                    held=S.InterlockHold(pv=h.pv, allowed=h.allowed or "", value=h.value, since=h.tripped_at)
                    if h else None).model_dump(mode="json"))
        return rows

    @api.get("/campaigns/{cid}/models", response_model=list[S.ModelVersionOut], tags=["models"])
    def models(cid: str, request: Request) -> Any:
        console.reader(request)
        camp = console.campaign(cid)
        return [S.ModelVersionOut(number=m.number, label=m.label, kind=m.kind, n_points=m.n_points,
                                  metrics=m.metrics or {}, calibration=m.calibration or {},
                                  created_at=m.created_at).model_dump(mode="json")
                for m in camp.ledger.model_versions(camp.row.id)]

    @api.get("/campaigns/{cid}/figures", response_model=S.FiguresOut, tags=["campaigns"])
    def figures(cid: str, request: Request) -> Any:
        console.reader(request)
        camp = console.campaign(cid)
        return figure_data(camp.ledger, camp.row.id, console.spec(camp))

    @api.get("/campaigns/{cid}/audit", response_model=S.CommandPage, tags=["audit"])
    def audit(cid: str, request: Request, limit: int = Query(100, ge=1, le=MAX_PAGE),
              offset: int = Query(0, ge=0, le=10**9)) -> Any:
        console.reader(request)
        camp = console.campaign(cid)
        with Session(camp.ledger.engine) as s:
            total = s.scalar(select(func.count()).select_from(CommandRow)
                             .where(CommandRow.campaign_id == camp.row.id)) or 0
        rows = camp.ledger.commands(camp.row.id, limit=limit, offset=offset)
        return {"total": total, "limit": limit, "offset": offset, "items": [_command_out(c) for c in rows]}

    _downloads = {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}},
                  "description": "the campaign's trials, one row each"}

    @api.get("/campaigns/{cid}/export.csv", tags=["exports"], response_class=Response,
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}})
    def export_csv(cid: str, request: Request) -> Response:
        console.reader(request)
        camp = console.campaign(cid)
        body = camp.ledger.trials_frame(camp.row.id).to_csv(index=False)
        return Response(body, media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{camp.row.name}-trials.csv"'})

    @api.get("/campaigns/{cid}/export.parquet", tags=["exports"], response_class=Response,
             responses={200: {"content": {"application/vnd.apache.parquet": {"schema": {"type": "string",
                                                                                       "format": "binary"}}}}})
    def export_parquet(cid: str, request: Request) -> Response:
        console.reader(request)
        camp = console.campaign(cid)
        buf = io.BytesIO()
        frame = camp.ledger.trials_frame(camp.row.id)
        frame.to_parquet(buf, index=False)
        return Response(buf.getvalue(), media_type="application/vnd.apache.parquet",
                        headers={"Content-Disposition": f'attachment; filename="{camp.row.name}-trials.parquet"'})

    # ---- control ----------------------------------------------------------------------
    def _deny(camp: _Camp, request: Request, action: str, trial: int | None, args: dict[str, Any] | None,
              reason: str, who: str, role: str, why: str) -> None:
        via = "console" if request.cookies.get(COOKIE) else "api"
        camp.ledger.add_command(camp.row.id, who[:100], role[:20], via, action, trial, args or {}, reason,
                                status="denied", outcome=why)

    def control_gate(request: Request) -> Principal:
        """Before the body is read: who asks, from where, with which CSRF token; every refusal is
        written to the campaign's audit log (a viewer's is written by Control.submit)."""
        camp = console.campaign(str(request.path_params.get("cid", "")))
        action = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        raw = str(request.path_params.get("number", ""))
        trial = int(raw) if raw.isdigit() and len(raw) < 10 else None
        where = {"station": str(request.path_params["station"])[:200]} if "station" in request.path_params else {}
        try:
            p = console.principal(request)
        except ApiError as exc:
            _deny(camp, request, action, trial, where, "", "(bad credentials)", "none", exc.error)
            raise
        try:
            console.writer_checks(request, p)
        except ApiError as exc:
            _deny(camp, request, action, trial, where, "", p.name or "anonymous", p.role or "none", exc.error)
            raise
        if p.anonymous:
            _deny(camp, request, action, trial, where, "", "anonymous", "none", "not logged in")
            raise ApiError(401, f"log in to {action}", None, "POST /api/login as an operator, or send "
                                                              "'Authorization: Bearer TOKEN'")
        request.state.principal = p
        return p

    def _submit(request: Request, cid: str, action: str, trial: int | None = None,
                args: dict[str, Any] | None = None, reason: str = "", frame: Any = None,
                source: str = "") -> Response:
        camp = console.campaign(cid)
        p: Principal = request.state.principal
        actor = Actor(p.name, p.role or "viewer", "console" if p.via == "cookie" else "api")
        control = Control(camp.ledger, camp.row.id)
        try:
            if frame is not None and p.role in CONTROL_ROLES:
                row = control.import_rows(actor, frame, source)
            else:
                row = control.submit(action, actor, trial, args, reason)
        except ControlError as exc:
            fix = None
            if exc.status == 403:
                fix = "ask an admin for the operator role"
            raise ApiError(exc.status, str(exc), None, fix) from None
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # control.py's checks tripped
            log.exception("console: checking %s failed", action)
            raise ApiError(409, f"{action} could not be checked: {type(exc).__name__}: {exc}", None,
                           "this is a labpilot bug; the console's log has the trace") from None
        if row.status == "pending" and control.live():  # nobody runs it now: it waits for the resume
            row = control.wait(row, timeout=console.wait_seconds)
        out = _command_out(row)
        if row.status == "refused":
            raise ApiError(409, row.outcome or f"{action} refused", None,
                           "the campaign refused it when carrying it out; refresh and look again", command=row)
        return JSONResponse(out, status_code=200 if row.status == "applied" else 202)

    _cmd = {"response_model": S.CommandOut, "tags": ["control"], "dependencies": [Depends(control_gate)],
            "responses": {202: {"model": S.CommandOut, "description": "written; the campaign is not running now "
                                "and carries it out when it resumes"}}}

    @api.post("/campaigns/{cid}/pause", **_cmd)
    def pause(cid: str, request: Request, body: S.ReasonIn | None = None) -> Any:
        return _submit(request, cid, "pause", reason=body.reason if body else "")

    @api.post("/campaigns/{cid}/resume", **_cmd)
    def resume(cid: str, request: Request, body: S.ReasonIn | None = None) -> Any:
        return _submit(request, cid, "resume", reason=body.reason if body else "")

    @api.post("/campaigns/{cid}/stop", **_cmd)
    def stop(cid: str, request: Request, body: S.ReasonIn | None = None) -> Any:
        return _submit(request, cid, "stop", reason=body.reason if body else "")

    @api.post("/campaigns/{cid}/budget", **_cmd)
    def budget(cid: str, body: S.BudgetIn, request: Request) -> Any:
        args = {k: v for k, v in (("max_trials", body.max_trials), ("max_wall_time", body.max_wall_time))
                if v is not None}
        return _submit(request, cid, "budget", args=args, reason=body.reason)

    @api.post("/campaigns/{cid}/add", **_cmd)
    def add(cid: str, body: S.AddIn, request: Request) -> Any:
        return _submit(request, cid, "add", args={"parameters": body.parameters}, reason=body.reason)

    @api.post("/campaigns/{cid}/import", **_cmd)
    def import_(cid: str, body: S.ImportIn, request: Request) -> Any:
        import pandas as pd

        return _submit(request, cid, "import", args={"rows": len(body.rows), "source": body.source},
                       frame=pd.DataFrame(body.rows), source=body.source)

    @api.post("/campaigns/{cid}/trials/{number}/approve", **_cmd)
    def approve(cid: str, number: TrialNumber, request: Request, body: S.ApproveIn | None = None) -> Any:
        args = {"edits": body.edits} if body and body.edits else {}
        return _submit(request, cid, "approve", number, args, body.reason if body else "")

    @api.post("/campaigns/{cid}/trials/{number}/reject", **_cmd)
    def reject(cid: str, number: TrialNumber, body: S.RejectIn, request: Request) -> Any:
        return _submit(request, cid, "reject", number, reason=body.reason)

    @api.post("/campaigns/{cid}/trials/{number}/abandon", **_cmd)
    def abandon(cid: str, number: TrialNumber, request: Request, body: S.ReasonIn | None = None) -> Any:
        return _submit(request, cid, "abandon", number, reason=body.reason if body else "")

    @api.post("/campaigns/{cid}/trials/{number}/requeue", **_cmd)
    def requeue(cid: str, number: TrialNumber, request: Request, body: S.ReasonIn | None = None) -> Any:
        return _submit(request, cid, "requeue", number, reason=body.reason if body else "")

    @api.post("/campaigns/{cid}/trials/{number}/tell", **_cmd)
    def tell(cid: str, number: TrialNumber, body: S.TellIn, request: Request) -> Any:
        args: dict[str, Any] = {"failed": body.failed} if body.failed else {"values": body.values or {}}
        return _submit(request, cid, "tell", number, args, body.reason)

    @api.post("/campaigns/{cid}/stations/{station}/retire", **_cmd)
    def retire(cid: str, station: Annotated[str, PathParam(max_length=200)], request: Request,
               body: S.ReasonIn | None = None) -> Any:
        return _submit(request, cid, "retire", args={"station": station}, reason=body.reason if body else "")

    @api.post("/campaigns/{cid}/stations/{station}/restore", **_cmd)
    def restore(cid: str, station: Annotated[str, PathParam(max_length=200)], request: Request,
                body: S.ReasonIn | None = None) -> Any:
        return _submit(request, cid, "restore", args={"station": station}, reason=body.reason if body else "")

    # ---- live -------------------------------------------------------------------------
    @app.websocket("/api/campaigns/{cid}/live")
    async def live(websocket: WebSocket, cid: str) -> None:
        headers = websocket.headers
        if not origin_ok(headers.get("origin"), headers.get("host")):
            await websocket.close(code=1008, reason="cross-origin")
            return
        try:
            p = console.auth.resolve(headers.get("authorization"), websocket.cookies.get(COOKIE))
        except AuthError:
            p = None
        if p is None or (p.anonymous and await asyncio.to_thread(console.auth.configured)):
            await websocket.close(code=1008, reason="log in first")
            return
        try:
            camp = await asyncio.to_thread(console.campaign, cid)
        except ApiError:
            await websocket.close(code=1008, reason="no such campaign")
            return
        await websocket.accept()
        feed = hub.feed(camp.key, camp.ledger, camp.row.id)
        client = Client(asyncio.get_running_loop())
        feed.add(client)

        async def pump() -> None:
            await websocket.send_json({"topic": "hello", "body": {"campaign": camp.key}})
            while True:
                await websocket.send_text(await client.next())

        sender = asyncio.create_task(pump())
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            sender.cancel()
            feed.remove(client)

    app.include_router(api)

    # ---- the page -----------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        return FileResponse(plotly_js_path(), media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    return app


def plotly_js_path() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


# ---- serving ------------------------------------------------------------------------------
class ServerHandle:
    """A console served by uvicorn on a thread: ``.url``, ``.stop()``."""

    def __init__(self, server: Any, thread: threading.Thread, host: str, port: int) -> None:
        self.server, self.thread, self.host, self.port = server, thread, host, port
        self.url = f"http://{host}:{port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> ServerHandle:
    """Serve ``app`` with uvicorn on a daemon thread; ``port=0`` picks a free one. Returns once it
    accepts connections (RuntimeError if it does not within ``timeout`` seconds)."""
    import socket
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", ws="websockets-sansio")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="labpilot-console", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the console did not start on {host}:{port}")
        time.sleep(0.05)
    return ServerHandle(server, thread, host if ":" not in host else f"[{host}]", port)
