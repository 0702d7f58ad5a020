"""The console's HTTP side: its static files (with a strict CSP), sign-in / sign-out, and the console-only JSON
of `data` (and of `ops`, the operator pages). `router` is what the app mounts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cumulo.errors import AuthenticationError, NotFound, PermissionDenied
from cumulo.service.api.deps import State
from cumulo.service.auth import authenticate, authenticate_key_id
from cumulo.service.console import data, ops, sessions
from cumulo.service.db import ApiKey
from cumulo.service.state import ServiceState

STATIC = Path(__file__).with_name("static")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}

router = APIRouter()


class SignIn(BaseModel):
    api_key: str = Field(min_length=1, max_length=256)


def _who(state: ServiceState, key_id: int, token: str) -> dict[str, Any]:
    with state.sessions() as session:
        principal = authenticate_key_id(session, key_id, sessions.nonce_of(token))
        key = session.get(ApiKey, key_id)
    return {
        "org": principal.org_name,
        "org_id": principal.org_id,
        "is_admin": principal.is_admin,
        "key_name": key.name if key else "",
        "key_prefix": key.prefix if key else "",
        "plan": principal.plan.name,
        "expires_at": sessions.expires_of(token),
        "csrf": sessions.csrf_of(state.hasher, token),
    }


def _same_origin(request: Request) -> None:
    # A sign-in posted from another site would sign the browser into the attacker's organisation.
    origin = request.headers.get("origin")
    if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
        raise PermissionDenied("sign-in must come from the console's own origin")


@router.post("/console/session")
async def sign_in(body: SignIn, request: Request, response: Response, state: State) -> dict[str, Any]:
    _same_origin(request)

    def open_session() -> tuple[dict[str, Any], str]:
        with state.sessions() as session:
            principal = authenticate(session, state.hasher, body.api_key.strip())
            key = session.get(ApiKey, principal.key_id)
            token = sessions.issue(state.hasher, principal.key_id, key.expires_at if key else None)
        return _who(state, principal.key_id, token), token

    who, token = await run_in_threadpool(open_session)
    response.set_cookie(
        sessions.COOKIE,
        token,
        max_age=max(1, who["expires_at"] - int(data.now())),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return who


@router.get("/console/session")
async def current_session(request: Request, state: State) -> dict[str, Any]:
    token = request.cookies.get(sessions.COOKIE)
    if not token:
        raise AuthenticationError("not signed in to the console")
    key_id = sessions.key_id_of(state.hasher, token)
    return await run_in_threadpool(_who, state, key_id, token)


@router.delete("/console/session")
async def sign_out(request: Request, response: Response, state: State) -> dict[str, Any]:
    """Deletes the cookie and ends the session server-side, so a copy of the cookie value is refused too."""
    token = request.cookies.get(sessions.COOKIE)
    if token:
        await run_in_threadpool(sessions.end, state.hasher, state.sessions, token)
    response.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="strict")
    return {"signed_out": True}


router.include_router(data.router)
router.include_router(ops.ops_router)


@router.get("/console", include_in_schema=False)
async def console_root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=308)


@router.get("/console/{path:path}", include_in_schema=False)
async def static_file(path: str, request: Request) -> Response:
    """index.html for the bare path, else a file under static/ of a known type; nothing outside static/.
    The browser revalidates every load (no-cache) and an unchanged file answers 304 without its body."""
    root = STATIC.resolve()
    target = (root / (path or "index.html")).resolve()
    media = TYPES.get(target.suffix)
    if not target.is_relative_to(root) or not target.is_file() or media is None:
        raise NotFound(f"no console file {path!r}")
    stat = target.stat()
    headers = {"cache-control": "no-cache", "etag": f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'}
    if request.headers.get("if-none-match") == headers["etag"]:
        return Response(status_code=304, headers=headers)
    return FileResponse(target, media_type=media, headers=headers)


class ConsoleHeaders:
    """Adds the CSP and the other security headers to every response under /console (errors included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/console"):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode().lower() not in HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
