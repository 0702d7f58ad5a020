"""Console sign-in sessions without a table: the cookie holds `key_id.expires.nonce.signature`, an HMAC over the
rest under a key derived from the service secret. The API key itself never enters the cookie.

Every request re-reads the key by id (`auth.authenticate_key_id`), so revoking or expiring the key ends every
session opened with it. Signing out (`end`) writes the session's nonce to `console_signouts`, which the same
query checks, so a copied cookie value is refused after sign-out too; the row is pruned once the session would
have expired anyway. The CSRF token is a second HMAC of the cookie value: the page gets it from
GET /console/session (same-origin only) and sends it as `X-CSRF-Token` on every write.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from cumulo.errors import AuthenticationError, PermissionDenied
from cumulo.service.db import ConsoleSignout
from cumulo.service.security import KeyHasher

COOKIE = "cumulo_session"
CSRF_HEADER = "x-csrf-token"
LIFETIME = 12 * 3600.0  # seconds; a session also ends when its key expires
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _session_key(hasher: KeyHasher) -> bytes:
    # Derived, not stored: every gateway sharing the service secret accepts the same sessions.
    return bytes.fromhex(hasher.hash("cumulo console session v1"))


def _sign(hasher: KeyHasher, purpose: str, text: str) -> str:
    return hmac.new(_session_key(hasher), f"{purpose}:{text}".encode(), hashlib.sha256).hexdigest()


def issue(hasher: KeyHasher, key_id: int, key_expires_at: float | None, now: float | None = None) -> str:
    now = time.time() if now is None else now
    expires = now + LIFETIME
    if key_expires_at is not None:
        expires = min(expires, key_expires_at)
    body = f"{key_id}.{int(expires)}.{secrets.token_urlsafe(12)}"
    return f"{body}.{_sign(hasher, 'session', body)}"


def key_id_of(hasher: KeyHasher, token: str, now: float | None = None) -> int:
    """The key id a valid, unexpired session token names; otherwise AuthenticationError."""
    body, _, signature = token.rpartition(".")
    parts = body.split(".")
    if len(parts) != 3 or not hmac.compare_digest(signature, _sign(hasher, "session", body)):
        raise AuthenticationError("console session is not valid; sign in again")
    key_id, expires = int(parts[0]), int(parts[1])
    if expires <= (time.time() if now is None else now):
        raise AuthenticationError("console session has expired; sign in again")
    return key_id


def expires_of(token: str) -> int:
    return int(token.split(".")[1])


def nonce_of(token: str) -> str:
    return token.split(".")[2]


def end(hasher: KeyHasher, sessions: sessionmaker, token: str, now: float | None = None) -> bool:
    """Ends a session for good: its nonce is stored until the session's own expiry, and the rows of sessions
    past theirs are pruned. False (and nothing stored) for a token that is not a valid, live session."""
    now = time.time() if now is None else now
    try:
        key_id = key_id_of(hasher, token, now)
    except AuthenticationError:
        return False
    with sessions() as session:
        with session.begin():
            session.execute(delete(ConsoleSignout).where(ConsoleSignout.expires_at <= now))
        try:
            with session.begin():
                session.add(
                    ConsoleSignout(nonce=nonce_of(token), key_id=key_id, expires_at=expires_of(token))
                )
        except IntegrityError:
            pass  # already signed out (two tabs, or a repeated click)
    return True


def csrf_of(hasher: KeyHasher, token: str) -> str:
    return _sign(hasher, "csrf", token)[:32]


def check_csrf(hasher: KeyHasher, token: str, method: str, header: str | None) -> None:
    if method.upper() in SAFE_METHODS:
        return
    if not header or not hmac.compare_digest(header, csrf_of(hasher, token)):
        raise PermissionDenied("missing or wrong X-CSRF-Token header for a console session")
