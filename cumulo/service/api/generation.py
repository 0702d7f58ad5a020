"""One generation request end to end, shared by chat and text completions: check the model and seal, admit
(limits + reservation), run on the engine, shape the answer (whole or SSE), label it, settle the usage row.

A streamed request whose client disconnects is cancelled by the response; the `finally` below then aborts the
engine sequences and bills exactly what was generated (shielded, so the cancellation cannot skip it). While it
streams, the tokens of every chunk sent are noted for the gateway's periodic checkpoint (`metering`), so a
gateway that dies still bills what its clients received; a whole response is delivered, and settled, at the end.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cumulo.contracts import EngineClient, SamplingParams
from cumulo.errors import ContextLengthExceeded, CumuloError, PermissionDenied, SealMismatch
from cumulo.service import labels, limits, metering
from cumulo.service.api.errors import error_body
from cumulo.service.api.run import Choice, Run
from cumulo.service.api.shapes import Shape, usage_dict
from cumulo.service.api.sse import EventStream, sse
from cumulo.service.auth import Principal
from cumulo.service.finetune.serving import resolve_tuned
from cumulo.service.state import ServiceState

log = logging.getLogger("cumulo.service")


@dataclass(slots=True)
class Job:
    endpoint: str  # "chat" | "completions"
    model: str
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool
    user: str | None
    idempotency_key: str | None


async def resolve_engine(
    state: ServiceState, principal: Principal, model: str, seal: str | None
) -> EngineClient:
    """A served model's engine, or for a fine-tuned model (`ft:...`, an imported adapter) its base's engine
    running that adapter (`service/finetune/serving.py`)."""
    if model not in state.engines:
        engine = await resolve_tuned(state, principal, model)
    else:
        engine = state.engine_for(model)
        if not principal.plan.allows(model):
            raise PermissionDenied(f"plan {principal.plan.name!r} does not include the model {model!r}")
    if seal is not None and seal != engine.info.seal:
        raise SealMismatch(f"the served model {model!r} has seal {engine.info.seal}, not {seal}")
    return engine


def fit_max_tokens(engine: EngineClient, prompts: list[list[int]], max_tokens: int | None) -> int:
    longest = max(len(p) for p in prompts)
    room = engine.info.max_model_len - longest
    if room < 1:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {engine.info.max_model_len} tokens; the prompt has {longest}"
        )
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {engine.info.max_model_len} tokens; the prompt has {longest} "
            f"and max_tokens asks for {max_tokens} more"
        )
    return max_tokens


async def generate(
    state: ServiceState, principal: Principal, engine: EngineClient, job: Job, shape_cls: type[Shape]
) -> Response:
    job.params.validate()
    arrival = time.monotonic()
    prefix = "chatcmpl" if job.endpoint == "chat" else "cmpl"
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    spec = limits.RequestSpec(
        request_id=request_id,
        endpoint=job.endpoint,
        model=job.model,
        seal=engine.info.seal,
        device=engine.info.device,
        gateway=state.gateway,
        prompt_tokens=sum(len(p) for p in job.prompts),
        num_seqs=len(job.prompts) * job.n,
        max_tokens=job.params.max_tokens,
        idempotency_key=job.idempotency_key,
        user=job.user,
    )
    shape = shape_cls(
        request_id=request_id,
        created=created,
        model=job.model,
        seal=engine.info.seal,
        tokenizer=engine.tokenizer,
    )
    try:
        admitted = await state.db_call(
            limits.admit, state.db, principal.key_id, spec, stale_after=state.settings.max_request_seconds
        )
    except CumuloError as exc:
        state.metrics.refused(endpoint=job.endpoint, code=exc.code or exc.type)
        raise
    headers = {"X-Request-Id": request_id, "X-Cumulo-Model-Seal": engine.info.seal}
    if isinstance(admitted, limits.Replay):
        stored = json.loads(admitted.response)
        headers = {
            "Idempotent-Replayed": "true",
            "X-Request-Id": stored["id"],
            "X-Cumulo-Model-Seal": stored.get("system_fingerprint", ""),
        }
        shape.check_replayable(stored)
        if not job.stream:
            return JSONResponse(stored, headers=headers)
        chunks = [sse(c) for c in shape.replay(stored)] + [sse("[DONE]")]
        return StreamingResponse(iter(chunks), media_type="text/event-stream", headers=headers)

    job.params.max_tokens = admitted.max_tokens
    run = Run(engine, job.prompts, job.n, job.params, request_id)
    state.metrics.started()
    run.start()
    finisher = _Finisher(state, principal, engine, job, shape, run, admitted, arrival, created)
    if job.stream:
        try:
            await run.first()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await finisher.close("error", exc, None)
            raise
        headers["X-Cumulo-Content-Id"] = request_id
        response = EventStream(_stream(finisher), media_type="text/event-stream", headers=headers)
        response.finalizer = lambda: finisher.close("aborted", None, None)
        return response
    status, error = "aborted", None
    try:
        async for _choice, _output in run.events():
            pass
        body = finisher.final_body()
        status = "completed"
    except Exception as exc:
        status, error = "error", exc
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await finisher.close(status, error, body if status == "completed" else None)
    if run.choices[0].label is not None:
        headers["X-Cumulo-Label"] = labels.header_value(run.choices[0].label)
    return JSONResponse(body, headers=headers)


class _Finisher:
    """Labels finished choices, builds the whole response, and settles usage exactly once."""

    def __init__(
        self,
        state: ServiceState,
        principal: Principal,
        engine: EngineClient,
        job: Job,
        shape: Shape,
        run: Run,
        admission: limits.Admission,
        arrival: float,
        created: int,
    ) -> None:
        self.state, self.principal, self.engine, self.job, self.shape = state, principal, engine, job, shape
        self.run, self.admission, self.arrival, self.created = run, admission, arrival, created
        self.closed = False

    def notice(self) -> str:
        if not self.principal.plan.explicit_label:
            return ""
        return labels.explicit_notice(self.job.model, self.state.settings.provider)

    def label_choice(self, choice: Choice, extra_text: str) -> None:
        choice.text += extra_text
        choice.label = self.state.labeler.label(
            text=choice.text,
            model=self.job.model,
            seal=self.engine.info.seal,
            content_id=f"{self.shape.request_id}-{choice.index}",
            created=self.created,
        )

    def usage(self) -> dict[str, Any]:
        return usage_dict(
            sum(len(p) for p in self.job.prompts), self.run.completion_tokens, self.run.cached_tokens
        )

    def final_body(self) -> dict[str, Any]:
        notice = self.notice()
        for choice in self.run.choices:
            if choice.label is None:
                self.label_choice(choice, notice)
        return self.shape.final(self.run.choices, self.usage())

    async def close(self, status: str, error: BaseException | None, body: dict[str, Any] | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.state.checkpoints.forget(self.admission.usage_id)
        await self.run.stop()
        ttft = None if self.run.first_token_time is None else self.run.first_token_time - self.arrival
        usage = self.usage()
        stored = json.dumps(body) if body is not None and self.job.idempotency_key else None
        code = getattr(error, "code", None) or (type(error).__name__ if error else None)
        outcome = metering.Outcome(
            status=status,
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
            ttft=ttft,
            error_code=code,
            response=stored,
        )
        try:
            await self.state.db_call(metering.settle, self.state.db, self.admission, outcome)
        except Exception:  # the row stays in_progress; recovery settles it as interrupted (metering)
            log.exception("could not settle usage row %s", self.admission.usage_id)
        self.state.metrics.finished(
            model=self.job.model,
            endpoint=self.job.endpoint,
            status=status,
            prompt=usage["prompt_tokens"],
            completion=usage["completion_tokens"],
            ttft=ttft,
            e2e=time.monotonic() - self.arrival,
        )


async def _stream(f: _Finisher) -> AsyncIterator[bytes]:
    status, error = "aborted", None
    body = None
    shape, run = f.shape, f.run
    include_usage = f.job.include_usage
    try:
        for choice in run.choices:
            opening = shape.opening(choice)
            if opening is not None:
                yield sse(_with_usage(shape.chunk([opening]), include_usage))
        notice = f.notice()
        async for choice, output in run.events():
            text = output.new_text
            if output.finished:
                f.label_choice(choice, notice)
                text += notice
            if text or output.new_logprobs or output.finished:
                part = shape.delta(choice, text, output.new_logprobs, output.finished)
                yield sse(_with_usage(shape.chunk([part]), include_usage))
                # Resumed: the chunk was written to the connection. Tokens without text so far go with it.
                f.state.checkpoints.note(f.admission.usage_id, run.completion_tokens)
        body = shape.final(run.choices, f.usage())
        if include_usage:
            yield sse(shape.chunk([], f.usage()))
        status = "completed"
        yield sse("[DONE]")
    except Exception as exc:  # after the headers went out, an error can only be told in the stream
        status, error = "error", exc
        if isinstance(exc, CumuloError):
            payload = error_body(str(exc), exc.type, exc.code)
        else:
            log.exception("generation failed")
            payload = error_body("internal server error", "server_error", "internal_error")
        yield sse(payload)
        yield sse("[DONE]")
    finally:
        with anyio.CancelScope(shield=True):
            await f.close(status, error, body)


def _with_usage(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    if include_usage:
        chunk["usage"] = None
    return chunk
