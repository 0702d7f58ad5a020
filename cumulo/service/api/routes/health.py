"""GET /health (liveness, a database round trip, each engine's own health) and GET /metrics (Prometheus text
format)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from cumulo.contracts import EngineClient, EngineHealth
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

    db_ok = await run_in_threadpool(ping)

    async def check(engine: EngineClient) -> EngineHealth:
        try:
            return await engine.health()
        except Exception as exc:  # an engine that cannot even answer is as down as one that says so
            return EngineHealth(ok=False, detail=f"health check failed: {exc}")

    healths = await asyncio.gather(*(check(e) for e in state.engines.values()))  # at once, not in turn
    models: dict[str, Any] = {}
    for (name, engine), h in zip(state.engines.items(), healths, strict=True):
        models[name] = {
            "seal": engine.info.seal,
            "device": engine.info.device,
            "status": "ok" if h.ok else "down",
            "running": h.num_running,
            "waiting": h.num_waiting,
        }
        if h.detail:
            models[name]["detail"] = h.detail
    ok = db_ok and all(m["status"] == "ok" for m in models.values())
    body: dict[str, Any] = {
        "status": "ok" if ok else "degraded",
        "database": "ok" if db_ok else "unreachable",
        "models": models,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
