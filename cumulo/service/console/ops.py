"""/console/api/... JSON of the playground, edge and operator pages that the public API lacks: the newest edge
results of an organisation, and for admins the pool's nodes with the engines served here, and the chip catalog
beside the performance model's predictions.

Nodes and chips are known to layers the service may not import (`cluster`'s Ray view, `chips`), so whoever runs
the gateway injects them as it does `deployment_check` (`cumulo serve`, `cumulo/cli/serve.py`):
- `app.state.ops_nodes` (`NodesProvider`): the machines serving, each a JSON-ready dict;
- `app.state.ops_chips` (`ChipsProvider`): the catalog with one prediction per chip for a `ChipQuery`.
Without one, its route answers an empty list and says why (`note`), so a test app or a bare gateway still works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from cumulo.service.api.deps import Admin, Caller, State
from cumulo.service.edge import results
from cumulo.service.edge.tables import EdgeDevice, EdgeResult

log = logging.getLogger("cumulo.service")
ops_router = APIRouter(prefix="/console/api")


@dataclass(frozen=True, slots=True)
class ChipQuery:
    """One workload to predict on every chip: a model preset, a weight format, a batch and a context."""

    model: str
    format: str
    batch: int
    context: int


NodesProvider = Callable[[], list[dict[str, Any]]]
ChipsProvider = Callable[[ChipQuery], dict[str, Any]]
"""Returns {"data": [chip dict with a "prediction" (or "error") each], "models": [...], "formats": [...]}; raises a
CumuloError for an unknown model or format."""


@ops_router.get("/edge/recent")
async def edge_recent(
    state: State, principal: Caller, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> dict[str, Any]:
    """The organisation's newest results, newest first, and each device's last one (which may be older)."""

    def read() -> dict[str, Any]:
        with state.sessions() as session:
            newest = session.execute(
                select(EdgeResult, EdgeDevice.device_id)
                .join(EdgeDevice, EdgeDevice.id == EdgeResult.device)
                .where(EdgeResult.org_id == principal.org_id)
                .order_by(EdgeResult.id.desc())
                .limit(limit)
            ).all()
            last_ids = (
                select(func.max(EdgeResult.id))
                .where(EdgeResult.org_id == principal.org_id)
                .group_by(EdgeResult.device)
            )
            last = session.execute(
                select(EdgeResult, EdgeDevice.device_id)
                .join(EdgeDevice, EdgeDevice.id == EdgeResult.device)
                .where(EdgeResult.id.in_(last_ids))
            ).all()
            return {
                "object": "list",
                "data": [results.view(row, name) for row, name in newest],
                "last_by_device": {name: results.view(row, name) for row, name in last},
            }

    return await run_in_threadpool(read)


@ops_router.get("/ops/nodes")
async def nodes(request: Request, state: State, _: Admin) -> dict[str, Any]:
    """The machines (from the injected provider) and every engine this gateway serves, with its health."""
    provider: NodesProvider | None = getattr(request.app.state, "ops_nodes", None)
    found: list[dict[str, Any]] = []
    note = "" if provider is not None else "this gateway was started without a view of its nodes"
    if provider is not None:
        try:
            found = list(await run_in_threadpool(provider))
        except Exception as exc:  # an unreachable pool must not hide the engines below
            log.exception("ops_nodes failed")
            note = f"the nodes could not be read: {exc}"
    engines = []
    for name, engine in dict(state.engines).items():
        try:
            health = await engine.health()
            ok, detail, running, waiting = health.ok, health.detail, health.num_running, health.num_waiting
        except Exception as exc:
            ok, detail, running, waiting = False, str(exc), 0, 0
        engines.append({
            "model": name, "device": engine.info.device, "seal": engine.info.seal, "ok": ok, "detail": detail,
            "running": running, "waiting": waiting, "max_model_len": engine.info.max_model_len,
        })  # fmt: skip
    return {"object": "list", "data": found, "engines": engines, "note": note}


@ops_router.get("/ops/chips")
async def chips(
    request: Request,
    _: Admin,
    model: Annotated[str, Query(min_length=1, max_length=64)] = "llama-3.1-8b",
    format: Annotated[str, Query(min_length=1, max_length=32)] = "bf16",
    batch: Annotated[int, Query(ge=1, le=4096)] = 8,
    context: Annotated[int, Query(ge=1, le=1_048_576)] = 2048,
) -> dict[str, Any]:
    """Every catalog chip with the performance model's prediction for one workload (docs/chips.md)."""
    provider: ChipsProvider | None = getattr(request.app.state, "ops_chips", None)
    query = ChipQuery(model=model, format=format, batch=batch, context=context)
    if provider is None:
        note = "this gateway was started without the chip catalog"
        return {
            "object": "list",
            "data": [],
            "models": [],
            "formats": [],
            "query": _as_dict(query),
            "note": note,
        }
    answer = await run_in_threadpool(provider, query)
    return {"object": "list", **answer, "query": _as_dict(query), "note": ""}


def _as_dict(query: ChipQuery) -> dict[str, Any]:
    return {"model": query.model, "format": query.format, "batch": query.batch, "context": query.context}
