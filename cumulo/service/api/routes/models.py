"""GET /v1/models: the models this key's plan may use, each with its seal."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from cumulo.contracts import EngineClient
from cumulo.errors import ModelNotFound
from cumulo.service.api.deps import Caller, State
from cumulo.service.api.schemas import MAX_NAME

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


@router.get("/v1/models")
async def list_models(state: State, principal: Caller) -> dict[str, Any]:
    created = int(state.started_at)
    data = [_card(n, e, created) for n, e in state.engines.items() if principal.plan.allows(n)]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}")
async def get_model(
    model: Annotated[str, Path(max_length=MAX_NAME)], state: State, principal: Caller
) -> dict[str, Any]:
    if not principal.plan.allows(model):
        raise ModelNotFound(f"the model {model!r} does not exist or your plan does not include it")
    return _card(model, state.engine_for(model), int(state.started_at))
