"""Fine-tuning jobs as the API sees them: create one (checked against the organisation's files, the plan and
the models that may be tuned), list, retrieve, cancel, and read its events and checkpoints. What a worker does
to a job (claim, progress, finish) is in `queue`; the training-token ledger in `billing`.

Status moves one way: validating_files -> queued -> running -> succeeded | failed | cancelled. A cancel is
final at once: a queued job never starts, a running one stops at its next step (the worker sees the status)
and bills what it trained.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cumulo.errors import NotFound, QuotaExceeded
from cumulo.service.api.errors import BadParameter
from cumulo.service.db import ApiKey
from cumulo.service.finetune import billing, files
from cumulo.service.finetune.tables import FinetuneCheckpoint, FinetuneEvent, FinetuneJob, FinetunePlan
from cumulo.service.finetune.terms import of_plan

ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
_NAME_PART = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(slots=True)
class JobRequest:
    """A checked POST /v1/fine_tuning/jobs body (schemas in the route)."""

    model: str
    source: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]  # OpenAI's names, values "auto" or numbers
    suffix: str | None
    seed: int | None
    metadata: dict[str, str] | None
    method: str = "supervised"  # supervised | dpo


def new_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


def plan_terms(session: Session, key_id: int) -> FinetunePlan:
    """The fine-tuning terms of a key's plan (defaults when the plan has none)."""
    return of_plan(session, session.scalar(select(ApiKey.plan_id).where(ApiKey.id == key_id)))


def create(session: Session, org_id: int, key_id: int, request: JobRequest) -> FinetuneJob:
    files.get(session, org_id, request.training_file)  # 404 for another organisation's file, as for none
    if request.validation_file is not None:
        try:
            files.get(session, org_id, request.validation_file)
        except NotFound as exc:
            raise NotFound(f"{exc} (validation_file)") from None
    terms = plan_terms(session, key_id)
    if terms.monthly_training_tokens is not None:
        used = billing.month_tokens(session, key_id, time.time())
        if used >= terms.monthly_training_tokens:
            raise QuotaExceeded(
                f"the monthly training-token quota of this plan is used up ({used} of "
                f"{terms.monthly_training_tokens} tokens this month)"
            )
    now = time.time()
    job = FinetuneJob(
        job_id=new_job_id(),
        org_id=org_id,
        key_id=key_id,
        model=request.model,
        source=request.source,
        training_file=request.training_file,
        validation_file=request.validation_file,
        method=method_view(request.method, request.hyperparameters),
        hyperparameters=request.hyperparameters,
        suffix=request.suffix,
        seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
        job_metadata=request.metadata,
        status="validating_files",
        priority=terms.priority,
        step=0,
        trained_tokens=0,
        billed_tokens=0,
        attempts=0,
        cancel_requested=False,
        created_at=now,
    )
    session.add(job)
    session.flush()
    add_event(session, job, f"Validating training file: {request.training_file}", now=now)
    return job


def get(session: Session, org_id: int, job_id: str, *, lock: bool = False) -> FinetuneJob:
    query = select(FinetuneJob).where(FinetuneJob.job_id == job_id, FinetuneJob.org_id == org_id)
    job = session.scalar(query.with_for_update() if lock else query)
    if job is None:
        raise NotFound(f"no fine-tuning job with id {job_id!r}")
    return job


def page(session: Session, org_id: int, *, after: str | None, limit: int) -> tuple[list[FinetuneJob], bool]:
    query = select(FinetuneJob).where(FinetuneJob.org_id == org_id)
    if after is not None:
        query = query.where(FinetuneJob.id < get(session, org_id, after).id)
    rows = list(session.scalars(query.order_by(FinetuneJob.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel(session: Session, org_id: int, job_id: str) -> FinetuneJob:
    job = get(session, org_id, job_id, lock=True)
    if job.status in FINAL:
        raise BadParameter(
            "fine_tuning_job_id", f"job {job_id} is already {job.status}; it cannot be cancelled"
        )
    was_running = job.status == "running"
    job.status, job.cancel_requested = "cancelled", True
    job.finished_at = time.time()
    if job.claim is None:
        billing.bill(session, job)  # no worker holds it: settle here (a worker settles its own when it stops)
    add_event(
        session, job, "Fine-tuning job cancelled" + (" (stopping at the next step)" if was_running else "")
    )
    return job


def add_event(
    session: Session,
    job: FinetuneJob,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    now: float | None = None,
) -> None:
    session.add(
        FinetuneEvent(
            job=job.id,
            created_at=time.time() if now is None else now,
            level=level,
            type=type,
            message=message,
            data=data,
        )
    )


def events(
    session: Session, job: FinetuneJob, *, after: str | None, limit: int
) -> tuple[list[FinetuneEvent], bool]:
    query = select(FinetuneEvent).where(FinetuneEvent.job == job.id)
    if after is not None:
        query = query.where(FinetuneEvent.id < _number(after, "ftevent-", "after"))
    rows = list(session.scalars(query.order_by(FinetuneEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def checkpoints(
    session: Session, job: FinetuneJob, *, after: str | None, limit: int
) -> tuple[list[FinetuneCheckpoint], bool]:
    query = select(FinetuneCheckpoint).where(FinetuneCheckpoint.job == job.id)
    if after is not None:
        query = query.where(FinetuneCheckpoint.id < _number(after, "ftckpt-", "after"))
    rows = list(session.scalars(query.order_by(FinetuneCheckpoint.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _number(public_id: str, prefix: str, param: str) -> int:
    digits = public_id.removeprefix(prefix)
    if not public_id.startswith(prefix) or not digits.isdigit() or len(digits) > 12:
        raise BadParameter(
            param, f"{param} must be an id of the previous page ({prefix}...), got {public_id!r}"
        )
    return int(digits)


def model_name(job: FinetuneJob, org_name: str) -> str:
    """OpenAI's `ft:BASE:ORG:SUFFIX:ID` (SUFFIX may be empty); ID is the job's first 8 hex digits."""
    org = _NAME_PART.sub("-", org_name).strip("-") or "org"
    return f"ft:{job.model}:{org}:{job.suffix or ''}:{job.job_id.removeprefix('ftjob-')[:8]}"


def succeeded_models(session: Session, org_id: int) -> list[FinetuneJob]:
    query = select(FinetuneJob).where(FinetuneJob.org_id == org_id, FinetuneJob.status == "succeeded")
    return list(session.scalars(query.order_by(FinetuneJob.id)))


# -- views: the shapes openai/types/fine_tuning/*.py parse --------------------------------------------------
def method_type(job: FinetuneJob) -> str:
    return str((job.method or {}).get("type", "supervised"))


def method_view(method: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method`: {"type": "dpo", "dpo": {"hyperparameters": {...}}} (or supervised)."""
    return {"type": method, method: {"hyperparameters": dict(hyperparameters)}}


def view(job: FinetuneJob, org_name: str) -> dict[str, Any]:
    hyper = dict(job.hyperparameters)
    method = method_view(method_type(job), hyper)
    hyper.pop("beta", None)  # the deprecated top-level field has supervised's names only
    return {
        "id": job.job_id,
        "object": "fine_tuning.job",
        "created_at": int(job.created_at),
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": int(job.finished_at) if job.finished_at is not None else None,
        "hyperparameters": hyper,
        "model": job.model,
        "organization_id": f"org-{org_name}",
        "result_files": [],
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens if job.status in FINAL else None,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": None,
        "integrations": [],
        "metadata": job.job_metadata,
        "method": method,
    }


def event_view(event: FinetuneEvent) -> dict[str, Any]:
    return {
        "id": f"ftevent-{event.id}",
        "object": "fine_tuning.job.event",
        "created_at": int(event.created_at),
        "level": event.level,
        "message": event.message,
        "data": event.data,
        "type": event.type,
    }


def checkpoint_view(checkpoint: FinetuneCheckpoint, job: FinetuneJob, org_name: str) -> dict[str, Any]:
    return {
        "id": f"ftckpt-{checkpoint.id}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": int(checkpoint.created_at),
        "fine_tuned_model_checkpoint": f"{model_name(job, org_name)}:ckpt-step-{checkpoint.step}",
        "fine_tuning_job_id": job.job_id,
        "metrics": {"step": checkpoint.step, **checkpoint.metrics},
        "step_number": checkpoint.step,
    }
