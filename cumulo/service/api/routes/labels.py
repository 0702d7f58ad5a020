"""POST /v1/labels/verify: did this text and label come from this service unaltered? GET the public key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cumulo.service.api.deps import State
from cumulo.service.api.schemas import VerifyRequest

router = APIRouter()


@router.post("/v1/labels/verify")
async def verify(body: VerifyRequest, state: State) -> dict[str, Any]:
    result = state.labeler.verify(body.text, body.label)
    return {"valid": result.valid, "reason": result.reason, "key_id": state.labeler.key_id}


@router.get("/v1/labels/public-key")
async def public_key(state: State) -> dict[str, Any]:
    return {
        "algorithm": "Ed25519",
        "key_id": state.labeler.key_id,
        "public_key": state.labeler.public_key_b64,
    }
