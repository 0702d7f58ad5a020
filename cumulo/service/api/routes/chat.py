"""POST /v1/chat/completions: renders the messages with the model's chat template, then generates."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from cumulo.service.api.deps import Caller, IdempotencyKey, State
from cumulo.service.api.errors import BadParameter
from cumulo.service.api.generation import Job, fit_max_tokens, generate, resolve_engine
from cumulo.service.api.schemas import ChatCompletionRequest
from cumulo.service.api.shapes import ChatShape

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    state: State,
    principal: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    if body.n > state.settings.max_n:
        raise BadParameter("n", f"n must be at most {state.settings.max_n}")
    engine = await resolve_engine(state, principal, body.model, body.seal)
    body.check_logit_bias(engine.tokenizer.vocab_size)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    max_tokens = fit_max_tokens(engine, [prompt], body.max_completion_tokens or body.max_tokens)
    params = body.sampling_params(max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    job = Job(
        endpoint="chat",
        model=body.model,
        prompts=[prompt],
        n=body.n,
        params=params,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        user=body.user,
        idempotency_key=idempotency_key,
    )
    return await generate(state, principal, engine, job, ChatShape)
