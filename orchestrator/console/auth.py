"""Who is asking: argon2 passwords, API tokens (stored as SHA-256), cookie sessions with CSRF.

- ``POST /api/login`` checks the password (argon2) and starts a session: a random id in an
  HttpOnly, SameSite=Strict cookie, kept server-side in memory (a restart logs everyone out),
  and a per-session CSRF token the page sends back as ``X-CSRF-Token`` on every POST.
- Scripts send ``Authorization: Bearer <token>``; the ledger keeps only the token's SHA-256.
  A bearer request needs no CSRF token (a browser never adds that header by itself).
- A request whose ``Origin`` header names another host than the console's is refused.
- When the users ledger holds no user (allowed on loopback only, see :func:`check_bind`), reads
  are anonymous; control is never anonymous.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from orchestrator.ledger import Ledger

ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
COOKIE = "labpilot_session"
SESSION_SECONDS = 12 * 3600
_hasher = PasswordHasher()
# verifying against this keeps an unknown user's login as slow as a known one's
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    """A new API token (shown once; the ledger keeps :func:`token_hash` of it)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The caller: a user (by cookie or token), or anonymous (name None)."""

    name: str | None
    role: str | None
    via: str  # cookie, token, anonymous
    session: str | None = None
    csrf: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.name is None

    def at_least(self, role: str) -> bool:
        return self.role is not None and ROLE_RANK.get(self.role, -1) >= ROLE_RANK[role]


ANONYMOUS = Principal(None, None, "anonymous")


@dataclass
class _Session:
    name: str
    csrf: str
    expires: float


class Sessions:
    """Cookie sessions, in memory: id -> user name, CSRF token, expiry."""

    def __init__(self, lifetime: float = SESSION_SECONDS) -> None:
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._by_id: dict[str, _Session] = {}

    def start(self, name: str) -> tuple[str, str]:
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._by_id = {k: v for k, v in self._by_id.items() if v.expires > now}
            self._by_id[sid] = _Session(name, csrf, now + self.lifetime)
        return sid, csrf

    def get(self, sid: str) -> _Session | None:
        with self._lock:
            s = self._by_id.get(sid)
            if s is None or s.expires < time.time():
                self._by_id.pop(sid, None)
                return None
            return s

    def end(self, sid: str) -> None:
        with self._lock:
            self._by_id.pop(sid, None)


class AuthError(Exception):
    def __init__(self, status: int, error: str, fix: str | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.fix = status, error, fix


class Authenticator:
    """Resolves a request's credentials to a :class:`Principal`."""

    def __init__(self, users: Ledger, auth_required: bool) -> None:
        self.users = users
        self.auth_required = auth_required
        self.sessions = Sessions()

    def configured(self) -> bool:
        """Auth is on: asked for, or the users ledger holds a user."""
        return self.auth_required or bool(self.users.users())

    def login(self, name: str, password: str) -> tuple[Principal, str]:
        user = self.users.user(name)
        ok = verify_password(user.password_hash if user else None, password)
        if user is None or user.disabled or not ok:
            raise AuthError(401, "wrong name or password", "check both; an admin sets passwords with "
                                                           "'labpilot user add NAME --role ROLE'")
        sid, csrf = self.sessions.start(user.name)
        return Principal(user.name, user.role, "cookie", sid, csrf), sid

    def resolve(self, authorization: str | None, cookie: str | None) -> Principal:
        """The caller, or ANONYMOUS; AuthError 401 for credentials that do not hold."""
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError(401, "the Authorization header is not 'Bearer <token>'",
                                "send 'Authorization: Bearer TOKEN' ('labpilot user token NAME' makes one)")
            user = self.users.user_by_token(token_hash(token.strip()))
            if user is None:
                raise AuthError(401, "unknown or revoked token",
                                "make a new one with 'labpilot user token NAME'")
            return Principal(user.name, user.role, "token")
        if cookie:
            s = self.sessions.get(cookie)
            if s is not None:
                user = self.users.user(s.name)
                if user is not None and not user.disabled:
                    return Principal(user.name, user.role, "cookie", cookie, s.csrf)
                self.sessions.end(cookie)
        return ANONYMOUS


def csrf_ok(principal: Principal, header: str | None) -> bool:
    return principal.via != "cookie" or (
        header is not None and principal.csrf is not None and hmac.compare_digest(header, principal.csrf))


def origin_ok(origin: str | None, host: str | None) -> bool:
    """No Origin header (not a browser's cross-site request), or one naming the console's own host."""
    if origin is None:
        return True
    if origin == "null" or not host:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def is_loopback_host(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UnsafeBind(RuntimeError):
    """Serving without users on a non-loopback address: anyone on the network could read it."""


def check_bind(host: str, users_ledger: Ledger) -> None:
    """Refuse to serve on ``host`` when it is not loopback and no user exists."""
    if is_loopback_host(host):
        return
    if not users_ledger.users():
        raise UnsafeBind(f"refusing to serve the console on {host}: no user exists, so anyone who can reach "
                         "it could read every campaign; add one first with 'labpilot user add NAME --role "
                         "admin', or serve on 127.0.0.1")
