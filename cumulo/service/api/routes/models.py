"""GET /v1/models: the models this key's plan may use, each with its seal, the organisation's fine-tuned
models and the adapters the operator imported whose base the plan includes (both with `parent`, the base they
were tuned from; called through `service/finetune/serving.py`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from cumulo.contracts import EngineClient
from cumulo.errors import ModelNotFound
from cumulo.service.api.deps import Caller, State
from cumulo.service.api.schemas import MAX_NAME
from cumulo.service.auth import Principal
from cumulo.service.finetune import jobs
from cumulo.service.finetune.serving import imported_models, resolve_tuned
from cumulo.service.state import ServiceState

router = APIRouter()


def _card(name: str, engine: EngineClient, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "cumulo",
        "seal": engine.info.seal,
        "max_model_len": engine.info.max_model_len,
        "device": engine.info.device,
    }


async def _tuned(state: ServiceState, org_id: int) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        with state.sessions() as session:
            done = jobs.succeeded_models(session, org_id)
        return [
            {
                "id": job.fine_tuned_model,
                "object": "model",
                "created": int(job.finished_at or job.created_at),
                "owned_by": "organization-owner",
                "parent": job.model,
            }
            for job in done
        ]

    return await run_in_threadpool(read)


async def _imported(state: ServiceState, principal: Principal) -> list[dict[str, Any]]:
    found = await run_in_threadpool(imported_models, state.settings.data_dir)
    return [
        {"id": name, "object": "model", "created": int(at), "owned_by": "cumulo", "parent": base}
        for name, base, at in found
        if base in state.engines and principal.plan.allows(base)
    ]


@router.get("/v1/models")
async def list_models(state: State, principal: Caller) -> dict[str, Any]:
    created = int(state.started_at)
    data = [_card(n, e, created) for n, e in state.engines.items() if principal.plan.allows(n)]
    tuned = await _tuned(state, principal.org_id)
    return {"object": "list", "data": data + tuned + await _imported(state, principal)}


@router.get("/v1/models/{model:path}")
async def get_model(
    model: Annotated[str, Path(max_length=MAX_NAME)], state: State, principal: Caller
) -> dict[str, Any]:
    if model not in state.engines:  # a fine-tuned model: its organisation's only, else the same 404
        engine = await resolve_tuned(state, principal, model)
        return {**_card(model, engine, int(state.started_at)), "owned_by": "organization-owner"}
    if not principal.plan.allows(model):
        raise ModelNotFound(f"the model {model!r} does not exist or your plan does not include it")
    return _card(model, state.engine_for(model), int(state.started_at))
