"""/admin/deployments: store, read and remove the models the pool serves. Needs an admin key.

Two optional hooks in the app's state, set by whoever runs the pool (`cumulo serve --cluster`):
- `app.state.deployment_check` (`deployments.SpecCheck`): refuses unknown chip ids and format names, which
  the service cannot look up itself; without it any non-empty name is stored.
- `app.state.deployment_status` (`Callable[[str], list[dict]]`): the live replicas of a model, shown as
  `replicas_status`; without it, or when it fails, that list is empty.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, StringConstraints
from starlette.concurrency import run_in_threadpool

from cumulo.service import deployments
from cumulo.service.api.deps import Admin, State
from cumulo.service.api.schemas import ModelName
from cumulo.service.db import Deployment
from cumulo.service.state import ServiceState

log = logging.getLogger("cumulo.service")
router = APIRouter(prefix="/admin/deployments")
Source = Annotated[str, StringConstraints(min_length=1, max_length=deployments.MAX_SOURCE)]
ShortName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class DeploymentCreate(BaseModel):
    """The whole deployment of `model`: fields left out take their defaults, as with `cumulo deploy`."""

    # An operator's misspelt field ("replica") must fail, not deploy one replica.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: ModelName
    source: Source | None = None  # catalog name, .gguf path or model directory; default: `model`
    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    format: ShortName | None = None
    chip: ShortName | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None


@router.post("")
async def deploy(
    body: DeploymentCreate, request: Request, response: Response, state: State, _: Admin
) -> dict:
    wanted = deployments.spec(**body.model_dump())
    check = getattr(request.app.state, "deployment_check", None)

    def write() -> tuple[dict[str, Any], bool]:
        with state.sessions() as session, session.begin():
            row, created = deployments.create_or_update(session, wanted, check)
            return deployments.as_dict(row), created

    view, created = await run_in_threadpool(write)
    response.status_code = 201 if created else 200
    return await _with_status(request, view)


@router.get("")
async def list_deployments(request: Request, state: State, _: Admin) -> dict[str, Any]:
    rows = await run_in_threadpool(_read, state, None)
    return {"object": "list", "data": [await _with_status(request, deployments.as_dict(r)) for r in rows]}


@router.get("/{model:path}")
async def get_deployment(
    model: Annotated[str, Path(max_length=deployments.MAX_NAME)], request: Request, state: State, _: Admin
) -> dict[str, Any]:
    (row,) = await run_in_threadpool(_read, state, model)
    return await _with_status(request, deployments.as_dict(row))


@router.delete("/{model:path}")
async def undeploy(
    model: Annotated[str, Path(max_length=deployments.MAX_NAME)], state: State, _: Admin
) -> dict[str, Any]:
    def write() -> dict[str, Any]:
        with state.sessions() as session, session.begin():
            return {"object": "deployment", **deployments.as_dict(deployments.delete(session, model))}

    return await run_in_threadpool(write)


def _read(state: ServiceState, model: str | None) -> list[Deployment]:
    with state.sessions() as session:
        if model is None:
            return deployments.list_deployments(session)
        return [deployments.get(session, model)]


async def _with_status(request: Request, view: dict[str, Any]) -> dict[str, Any]:
    provider = getattr(request.app.state, "deployment_status", None)
    replicas: list[dict] = []
    if provider is not None:
        try:
            replicas = list(await run_in_threadpool(provider, view["model"]))
        except Exception:  # the pool being unreachable must not hide what is stored
            log.exception("deployment_status failed for %s", view["model"])
    return {"object": "deployment", **view, "replicas_status": replicas}
