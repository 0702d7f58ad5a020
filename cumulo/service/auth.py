"""Who is calling: turns a bearer secret into a `Principal` (key, organisation, plan terms) or refuses."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.orm import Session, sessionmaker

from cumulo.errors import AuthenticationError, NotFound
from cumulo.service import crud
from cumulo.service.db import ApiKey, ConsoleSignout, Organization, Plan
from cumulo.service.security import KEY_PREFIX, KeyHasher


@dataclass(frozen=True, slots=True)
class PlanTerms:
    name: str
    models: tuple[str, ...] | None
    explicit_label: bool

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: int
    org_id: int
    org_name: str
    is_admin: bool
    plan: PlanTerms


def check_format(secret: str | None) -> str:
    if not secret:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer sk-cumulo-...'")
    if not secret.startswith(KEY_PREFIX):
        raise AuthenticationError("invalid API key")
    return secret


def authenticate(
    session: Session, hasher: KeyHasher, secret: str | None, key_hash: str | None = None
) -> Principal:
    secret = check_format(secret)
    return _principal(session, ApiKey.key_hash == (key_hash or hasher.hash(secret)))


def authenticate_key_id(session: Session, key_id: int, nonce: str | None = None) -> Principal:
    """The principal of a console session, which names its key by id: revocation and expiry are checked here,
    on every request, so revoking the key ends every session opened with it. With the session's `nonce`, the
    same query also refuses a session ended by signing out (a copied cookie value included)."""
    signed_out = None
    if nonce is not None:
        signed_out = exists().where(ConsoleSignout.nonce == nonce).label("signed_out")
    return _principal(session, ApiKey.id == key_id, signed_out)


def _principal(
    session: Session, which: ColumnElement[bool], signed_out: ColumnElement[bool] | None = None
) -> Principal:
    columns: list[object] = [ApiKey, Organization.name, Plan]
    if signed_out is not None:
        columns.append(signed_out)
    row = session.execute(
        select(*columns)  # type: ignore[call-overload]
        .join(Organization, Organization.id == ApiKey.org_id)
        .join(Plan, Plan.id == ApiKey.plan_id)
        .where(which)
    ).first()
    if row is None:
        raise AuthenticationError("invalid API key")
    key, org_name, plan = row[:3]
    if signed_out is not None and row[3]:
        raise AuthenticationError("console session has ended (signed out); sign in again")
    if key.revoked_at is not None:
        raise AuthenticationError("this API key has been revoked")
    if key.expires_at is not None and key.expires_at <= time.time():
        raise AuthenticationError("this API key has expired")
    terms = PlanTerms(plan.name, tuple(plan.models) if plan.models is not None else None, plan.explicit_label)
    return Principal(key.id, key.org_id, org_name, key.is_admin, terms)


def revoke_key(
    sessions: sessionmaker, principals: PrincipalCache, key_id: int, org_id: int | None = None
) -> dict[str, object]:
    """Revokes a key (of organisation `org_id` only, when given: another's answers 404 like a missing one) and
    drops it from this gateway's principal cache once the revocation is committed, so this gateway refuses it
    at once; other gateways wait out the cache's `ttl`. Both revoke routes (admin API, console) use this."""
    with sessions() as session, session.begin():
        key = session.get(ApiKey, key_id)
        if key is None or (org_id is not None and key.org_id != org_id):
            raise NotFound(f"no key with id {key_id}")
        key = crud.revoke_key(session, key_id)
        answer: dict[str, object] = {"id": key.id, "revoked_at": key.revoked_at}
        key_hash = key.key_hash
    principals.forget(key_hash)
    return answer


class PrincipalCache:
    """Remembers recent authentications for a few seconds so most requests skip a database round trip.

    Safe because admission re-checks revocation and expiry under the key's row lock: a revoked key cannot start
    a generation. Only reads (usage, models) may still succeed for up to `ttl` seconds after a revocation.
    """

    def __init__(self, ttl: float = 5.0, size: int = 10_000) -> None:
        self.ttl, self.size = ttl, size
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def forget(self, key_hash: str) -> None:
        """Drops one key at once (a revocation through this gateway); other gateways wait out `ttl`."""
        with self._lock:
            self._entries.pop(key_hash, None)

    def put(self, key_hash: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) >= self.size:
                self._entries.clear()  # crude but bounded; a cold cache only costs one lookup per key
            self._entries[key_hash] = (time.monotonic() + self.ttl, principal)
