"""OpenAI's fine-tuning jobs API: create, list, retrieve, cancel, events, checkpoints. Shapes are the ones the
official client parses (openai/types/fine_tuning/). Jobs belong to the creator's organisation; another gets
a 404. Training runs in a worker process (`cumulo finetune worker`); this only reads and writes the job rows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from cumulo.errors import ModelNotFound
from cumulo.service.api.deps import Caller, State, only_query
from cumulo.service.api.errors import BadParameter
from cumulo.service.api.schemas import INT32_MAX, MAX_NAME
from cumulo.service.auth import Principal
from cumulo.service.finetune import jobs
from cumulo.service.state import ServiceState

router = APIRouter(prefix="/v1/fine_tuning")
JobId = Annotated[str, Path(min_length=1, max_length=64)]
_Auto = Annotated[str, StringConstraints(max_length=4, pattern=r"^auto$")]


class _Hyper(BaseModel):
    """Each "auto" or a number. The ranges are the trainer's (cumulo.finetune.api.resolve_hyperparameters),
    checked here too so a bad value is a 400 now rather than a failed job later."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    n_epochs: _Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: _Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: _Auto | Annotated[float, Field(gt=0, le=100)] = "auto"


class _DpoHyper(_Hyper):
    """OpenAI's DPO hyperparameters: the supervised ones and beta ("auto" or a number in (0, 2])."""

    beta: _Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


class _Supervised(BaseModel):
    model_config = ConfigDict(extra="ignore")
    hyperparameters: _Hyper | None = None


class _Dpo(BaseModel):
    model_config = ConfigDict(extra="ignore")
    hyperparameters: _DpoHyper | None = None


class _Method(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: _Supervised | None = None
    dpo: _Dpo | None = None


_Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class JobBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
    training_file: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    validation_file: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    hyperparameters: _Hyper | None = None  # deprecated by OpenAI in favour of method; both work
    method: _Method | None = None
    suffix: _Name | None = None
    seed: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    metadata: (
        dict[
            Annotated[str, StringConstraints(max_length=64)],
            Annotated[str, StringConstraints(max_length=512)],
        ]
        | None
    ) = Field(default=None, max_length=16)
    integrations: list[Annotated[dict[str, Any], Field(max_length=8)]] | None = Field(
        default=None, max_length=16
    )


def _hyperparameters(body: JobBody) -> tuple[str, dict[str, Any]]:
    """(method type, its hyperparameters as asked). The deprecated top-level field is supervised's."""
    method = body.method.type if body.method is not None else "supervised"
    if method == "reinforcement":
        raise BadParameter(
            "method.type", "reinforcement fine-tuning is not supported yet; use supervised or dpo"
        )
    if method == "dpo":
        if body.hyperparameters is not None:
            raise BadParameter("hyperparameters", "give DPO hyperparameters in method.dpo.hyperparameters")
        dpo = body.method.dpo if body.method is not None else None
        return method, (dpo and dpo.hyperparameters or _DpoHyper()).model_dump()
    from_method = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if from_method is not None and body.hyperparameters is not None:
        raise BadParameter(
            "hyperparameters", "give hyperparameters in method.supervised or at the top, not both"
        )
    chosen = from_method or body.hyperparameters or _Hyper()
    return method, chosen.model_dump()


def _source(state: ServiceState, principal: Principal, model: str) -> str:
    """What the worker loads for `model`: a configured tunable model, else a model served here."""
    if principal.plan.allows(model):
        if model in state.settings.finetune_models:
            return state.settings.finetune_models[model]
        if model in state.engines:
            return model
    raise ModelNotFound(
        f"the model {model!r} does not exist, cannot be fine-tuned here, or your plan does not include it"
    )


@router.post("/jobs")
async def create(body: JobBody, state: State, principal: Caller) -> dict[str, Any]:
    if body.integrations:
        raise BadParameter("integrations", "integrations are not supported")
    method, hyperparameters = _hyperparameters(body)
    request = jobs.JobRequest(
        model=body.model,
        source=_source(state, principal, body.model),
        training_file=body.training_file,
        validation_file=body.validation_file,
        method=method,
        hyperparameters=hyperparameters,
        suffix=body.suffix,
        seed=body.seed,
        metadata=body.metadata,
    )

    def write() -> dict[str, Any]:
        with state.sessions() as session, session.begin():
            job = jobs.create(session, principal.org_id, principal.key_id, request)
            return jobs.view(job, principal.org_name)

    return await run_in_threadpool(write)


@router.get("/jobs", dependencies=[only_query("after", "limit")])
async def list_jobs(
    state: State,
    principal: Caller,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            rows, has_more = jobs.page(session, principal.org_id, after=after, limit=limit)
            return {
                "object": "list",
                "data": [jobs.view(r, principal.org_name) for r in rows],
                "has_more": has_more,
            }

    return await run_in_threadpool(read)


@router.get("/jobs/{job_id}")
async def retrieve(job_id: JobId, state: State, principal: Caller) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            return jobs.view(jobs.get(session, principal.org_id, job_id), principal.org_name)

    return await run_in_threadpool(read)


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: JobId, state: State, principal: Caller) -> dict[str, Any]:
    def write() -> dict[str, Any]:
        with state.sessions() as session, session.begin():
            return jobs.view(jobs.cancel(session, principal.org_id, job_id), principal.org_name)

    return await run_in_threadpool(write)


@router.get("/jobs/{job_id}/events", dependencies=[only_query("after", "limit")])
async def events(
    job_id: JobId,
    state: State,
    principal: Caller,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            job = jobs.get(session, principal.org_id, job_id)
            rows, has_more = jobs.events(session, job, after=after, limit=limit)
            return {"object": "list", "data": [jobs.event_view(r) for r in rows], "has_more": has_more}

    return await run_in_threadpool(read)


@router.get("/jobs/{job_id}/checkpoints", dependencies=[only_query("after", "limit")])
async def checkpoints(
    job_id: JobId,
    state: State,
    principal: Caller,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.sessions() as session:
            job = jobs.get(session, principal.org_id, job_id)
            rows, has_more = jobs.checkpoints(session, job, after=after, limit=limit)
            data = [jobs.checkpoint_view(r, job, principal.org_name) for r in rows]
        return {
            "object": "list",
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    return await run_in_threadpool(read)
