"""GET /health (liveness plus a database round trip) and GET /metrics (Prometheus text format)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from cumulo.service.api.deps import State

router = APIRouter()


@router.get("/health")
async def health(state: State) -> JSONResponse:
    def ping() -> bool:
        try:
            with state.db.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    ok = await run_in_threadpool(ping)
    body: dict[str, Any] = {
        "status": "ok" if ok else "degraded",
        "database": "ok" if ok else "unreachable",
        "models": {name: {"seal": e.seal, "device": e.device} for name, e in state.engines.items()},
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(state: State) -> PlainTextResponse:
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")
