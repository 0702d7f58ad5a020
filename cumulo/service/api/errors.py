"""Maps every failure to OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}` with its status.

Validation errors and malformed JSON are 400 (OpenAI's choice, not FastAPI's 422); unknown routes 404; bodies over
the limit 413 (enforced by `BodyLimit` before any parsing); anything unexpected 500 without internals, answered
by `CatchUnexpected` so that the connection stays open for the client's next request.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cumulo.errors import CumuloError, InvalidRequest, RateLimited

log = logging.getLogger("cumulo.service")


class BadParameter(InvalidRequest):
    """An invalid request that names the parameter at fault (OpenAI's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _encodable(text: str | None) -> str | None:
    # A message may quote the request, and JSON from a client can hold lone surrogates that UTF-8 cannot carry.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {
        "error": {"message": _encodable(message), "type": type_, "param": _encodable(param), "code": code}
    }


def error_response(exc: CumuloError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(int(max(1, round(exc.retry_after))))
    body = error_body(str(exc), exc.type, exc.code, getattr(exc, "param", None))
    return JSONResponse(body, status_code=exc.status, headers=headers)


_WHERE = ("body", "query", "path", "header")
_PRIMITIVES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    """`messages.0.content` from pydantic's location, without the tags of union members."""
    parts = []
    for i, p in enumerate(loc):
        if i == 0 and p in _WHERE:
            continue
        if isinstance(p, str) and (p in _PRIMITIVES or p.startswith("constrained-") or "[" in p):
            continue  # a union member ('list[str]', 'constrained-str') or pydantic's '[key]' marker
        parts.append(str(p))
    return ".".join(parts) or None


def _telling(error: dict) -> tuple[bool, int]:
    # A union reports one error per member: a broken limit says more than a type that did not match, and the
    # member that got deepest into the value says most.
    mismatch = error.get("type", "").endswith(("_type", "_parsing"))
    return mismatch, -len(error.get("loc", ()))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if any(e.get("type") == "json_invalid" for e in errors):
        return "request body is not valid JSON", None
    error = min(errors, key=_telling)
    param = _param(tuple(error.get("loc", ())))
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        return f"missing required parameter: {param}", param
    return f"invalid value for {param}: {msg}" if param else msg, param


def install(app: FastAPI) -> None:
    app.add_middleware(CatchUnexpected)

    @app.exception_handler(CumuloError)
    async def _cumulo(_: Request, exc: CumuloError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", None, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type_, code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return _internal_error()


def _internal_error() -> JSONResponse:
    return JSONResponse(
        error_body("internal server error", "server_error", "internal_error"), status_code=500
    )


class CatchUnexpected:
    """ASGI middleware: an exception no handler took becomes OpenAI's 500 error JSON here, and is not raised on.

    Starlette's last-resort handler answers too, but then re-raises so the server can log it, and uvicorn closes
    the connection: the client's next request on that keep-alive connection fails as well. A response that has
    already started cannot be repaired; that exception goes on, and the connection ends.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            log.exception("unexpected error", exc_info=exc)
            await _internal_error()(scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes` with 413, by Content-Length or while streaming in."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}  # path -> its own limit (file uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.larger.get(scope.get("path", ""), self.max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
                await self._refuse(send, max_bytes)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading, so this reaches `_http` as a 413.
                    raise HTTPException(413, f"request body larger than {max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, send: Send, max_bytes: int) -> None:
        response = JSONResponse(
            error_body(
                f"request body larger than {max_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
            ),
            status_code=413,
        )
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
