"""POST /v1/completions: a prompt (text, token ids, or a batch of either) continued by the model."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from cumulo.contracts import EngineClient
from cumulo.service.api.deps import Caller, IdempotencyKey, State
from cumulo.service.api.errors import BadParameter
from cumulo.service.api.generation import Job, fit_max_tokens, generate, resolve_engine
from cumulo.service.api.schemas import MAX_BATCH, CompletionRequest
from cumulo.service.api.shapes import CompletionShape

router = APIRouter()


def _prompts(engine: EngineClient, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if not items or len(items) > MAX_BATCH:
        raise BadParameter("prompt", f"prompt must hold 1 to {MAX_BATCH} prompts")
    prompts: list[list[int]] = []
    vocab = engine.tokenizer.vocab_size
    for item in items:
        ids = engine.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if any(t < 0 or t >= vocab for t in ids):
            raise BadParameter("prompt", f"prompt token ids must be in [0, {vocab})")
        if not ids:
            raise BadParameter("prompt", "prompt must not be empty")
        prompts.append(ids)
    return prompts


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    state: State,
    principal: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    engine = await resolve_engine(state, principal, body.model, body.seal)
    body.check_logit_bias(engine.tokenizer.vocab_size)
    prompts = _prompts(engine, body.prompt)
    if body.n * len(prompts) > state.settings.max_n * 4:
        raise BadParameter(
            "n",
            f"too many sequences: n times the number of prompts must be at most {state.settings.max_n * 4}",
        )
    max_tokens = fit_max_tokens(engine, prompts, body.max_tokens)
    params = body.sampling_params(max_tokens, body.logprobs)
    job = Job(
        endpoint="completions",
        model=body.model,
        prompts=prompts,
        n=body.n,
        params=params,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        user=body.user,
        idempotency_key=idempotency_key,
    )
    return await generate(state, principal, engine, job, CompletionShape)
