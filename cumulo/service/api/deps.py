"""Dependencies of the routes: the service state, the calling key (`Principal`), the admin check, and the checks
of query strings and headers (`only_query`, `IdempotencyKey`).

Database work is synchronous SQLAlchemy, so it runs in the thread pool, never on the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from starlette.concurrency import run_in_threadpool

from cumulo.errors import PermissionDenied
from cumulo.service.api.errors import BadParameter
from cumulo.service.api.schemas import INT32_MAX, LATEST_TIME
from cumulo.service.auth import Principal, authenticate, authenticate_key_id, check_format
from cumulo.service.console import sessions
from cumulo.service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    # async on purpose: FastAPI runs plain `def` dependencies in the thread pool, a costly hop per request.
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


async def get_principal(request: Request, state: State) -> Principal:
    """The calling key: from `Authorization: Bearer` (or `X-API-Key`), else from the console's session cookie,
    which must bring its CSRF token on every write (cumulo/service/console/sessions.py)."""
    bearer = _bearer(request)
    token = request.cookies.get(sessions.COOKIE)
    if bearer is None and token:
        return await _session_principal(request, state, token)
    secret = check_format(bearer)
    key_hash = state.hasher.hash(secret)
    cached = state.principals.get(key_hash)
    if cached is not None:
        return cached

    def lookup() -> Principal:
        with state.sessions() as session:
            return authenticate(session, state.hasher, secret, key_hash)

    principal = await run_in_threadpool(lookup)
    state.principals.put(key_hash, principal)
    return principal


async def _session_principal(request: Request, state: ServiceState, token: str) -> Principal:
    key_id = sessions.key_id_of(state.hasher, token)
    sessions.check_csrf(state.hasher, token, request.method, request.headers.get(sessions.CSRF_HEADER))

    def lookup() -> Principal:
        with state.sessions() as session:
            return authenticate_key_id(session, key_id, sessions.nonce_of(token))

    # No cache: a revoked key, or a signed-out session, ends at once (one query reads both).
    return await run_in_threadpool(lookup)


Caller = Annotated[Principal, Depends(get_principal)]


async def get_admin(principal: Caller) -> Principal:
    if not principal.is_admin:
        raise PermissionDenied("this endpoint needs an admin key")
    return principal


Admin = Annotated[Principal, Depends(get_admin)]


# Stored with the usage row, so no control characters (PostgreSQL refuses NUL in text).
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]

# The usage filters of GET /v1/usage and GET /admin/usage.
StartTime = Annotated[float | None, Query(ge=0, le=LATEST_TIME, description="Unix seconds, inclusive")]
EndTime = Annotated[float | None, Query(ge=0, le=LATEST_TIME, description="Unix seconds, exclusive")]
After = Annotated[int | None, Query(ge=1, le=INT32_MAX, description="the last id of the previous page")]


def only_query(*names: str) -> Any:
    """A dependency refusing query parameters other than `names`: a misspelt filter (`?start=` for
    `?start_time=`) would otherwise be ignored, and the answer would cover everything."""

    async def check(request: Request) -> None:
        for given in request.query_params:
            if given not in names:
                raise BadParameter(
                    given, f"unknown query parameter {given!r}; this endpoint takes {', '.join(names)}"
                )

    return Depends(check)
