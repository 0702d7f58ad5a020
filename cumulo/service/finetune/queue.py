"""What a worker does to jobs in the database: claim the next one, keep its heartbeat, record progress,
checkpoints and the outcome, and requeue the jobs of workers that went silent.

A worker owns a job while the job's `claim` holds the worker's token; every write of a worker is conditional on
that token, so a worker taken for dead (its job requeued and perhaps claimed by another) changes nothing any
more and learns so at its next step. Validation goes first (it is quick, and a bad file should be reported
within seconds however long the queue is); then the plan's priority, then age. A claim takes a
job in `validating_files` (to validate it) or in `queued` (to train it; at most `max_jobs` running per key
when the plan caps it). On PostgreSQL claims serialize on an advisory lock, so two workers never both see
room under a key's cap; SQLite's BEGIN IMMEDIATE serializes them already.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, or_, select, text
from sqlalchemy.orm import Session, aliased, sessionmaker

from cumulo.service import sql
from cumulo.service.db import ApiKey, Organization
from cumulo.service.finetune import billing, jobs
from cumulo.service.finetune.tables import FinetuneCheckpoint, FinetuneJob, FinetunePlan, StoredFile

_CLAIM_LOCK = 0x46544A42  # "FTJB"


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a worker needs to run a claimed job, read in the claiming transaction."""

    id: int
    job_id: str
    claim: str
    status: str  # validating_files | running
    model: str
    source: str
    training_path: str | None  # None: the file was deleted
    validation_path: str | None
    validation_file: str | None
    hyperparameters: dict[str, Any]
    seed: int
    attempts: int
    method: str = "supervised"  # supervised | dpo


def new_claim() -> str:
    return secrets.token_hex(16)


def _db_now(session: Session) -> float:
    return float(sql.DB_NOW.run(session.connection(), {}).fetchone()[0])


def claim_next(sessions: sessionmaker, claim: str) -> Claimed | None:
    with sessions() as session, session.begin():
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _CLAIM_LOCK})
        running = aliased(FinetuneJob)
        running_of_key = (
            select(func.count(running.id))
            .where(running.key_id == FinetuneJob.key_id, running.status == "running")
            .scalar_subquery()
        )
        query = (
            select(FinetuneJob)
            .join(ApiKey, ApiKey.id == FinetuneJob.key_id)
            .outerjoin(FinetunePlan, FinetunePlan.plan_id == ApiKey.plan_id)
            .where(
                FinetuneJob.claim.is_(None),
                or_(
                    FinetuneJob.status == "validating_files",
                    and_(
                        FinetuneJob.status == "queued",
                        or_(FinetunePlan.max_jobs.is_(None), running_of_key < FinetunePlan.max_jobs),
                    ),
                ),
            )
            .order_by(
                case((FinetuneJob.status == "validating_files", 0), else_=1),
                FinetuneJob.priority.desc(),
                FinetuneJob.created_at,
                FinetuneJob.id,
            )
            .limit(1)
            .with_for_update(of=FinetuneJob, skip_locked=True)
        )
        job = session.scalar(query)
        if job is None:
            return None
        now = _db_now(session)
        job.claim, job.heartbeat_at = claim, now
        if job.status == "queued":
            job.status, job.attempts = "running", job.attempts + 1
            job.started_at = job.started_at or time.time()
            jobs.add_event(
                session,
                job,
                "Fine-tuning job started"
                if job.attempts == 1
                else f"Fine-tuning job resumed (attempt {job.attempts})",
            )
        training = _path(session, job.org_id, job.training_file)
        validation = _path(session, job.org_id, job.validation_file) if job.validation_file else None
        return Claimed(
            job.id,
            job.job_id,
            claim,
            job.status,
            job.model,
            job.source,
            training,
            validation,
            job.validation_file,
            dict(job.hyperparameters),
            job.seed,
            job.attempts,
            jobs.method_type(job),
        )


def _path(session: Session, org_id: int, file_id: str) -> str | None:
    return session.scalar(
        select(StoredFile.path).where(
            StoredFile.file_id == file_id, StoredFile.org_id == org_id, StoredFile.deleted_at.is_(None)
        )
    )


def _mine(session: Session, job: Claimed) -> FinetuneJob | None:
    row = session.scalar(
        select(FinetuneJob).where(FinetuneJob.id == job.id, FinetuneJob.claim == job.claim).with_for_update()
    )
    return row


def heartbeat(sessions: sessionmaker, job: Claimed) -> bool:
    """True while the job is still this worker's and still wanted (not cancelled)."""
    with sessions() as session, session.begin():
        row = _mine(session, job)
        if row is None:
            return False
        row.heartbeat_at = _db_now(session)
        return row.status in ("validating_files", "running")


def validated(
    sessions: sessionmaker, job: Claimed, n_examples: int, n_train_tokens: int, hyper: dict[str, Any]
) -> bool:
    """validating_files -> queued with the resolved hyperparameters; the claim is let go so the queue decides
    when it trains. False when the job is no longer this worker's or was cancelled meanwhile."""
    with sessions() as session, session.begin():
        row = _mine(session, job)
        if row is None or row.status != "validating_files":
            return False
        row.status, row.claim, row.heartbeat_at = "queued", None, None
        row.n_examples, row.n_train_tokens, row.hyperparameters = n_examples, n_train_tokens, hyper
        row.method = jobs.method_view(jobs.method_type(row), hyper)
        jobs.add_event(
            session,
            row,
            f"Files validated: {n_examples} examples, {n_train_tokens} training tokens per epoch; job queued",
            data={"n_examples": n_examples, "n_train_tokens": n_train_tokens},
        )
        return True


def progress(
    sessions: sessionmaker,
    job: Claimed,
    *,
    step: int,
    total_steps: int,
    trained_tokens: int,
    train_loss: float | None,
    valid_loss: float | None,
    metrics: dict[str, float] | None = None,
) -> str | None:
    """Records a step (and a metrics event). Returns why the worker should stop, or None: 'lost' (another
    worker owns it now), 'cancelled', or 'quota' (the key's monthly training tokens would be exceeded)."""
    with sessions() as session, session.begin():
        row = _mine(session, job)
        if row is None:
            return "lost"
        row.heartbeat_at = _db_now(session)
        row.step, row.total_steps = step, total_steps
        row.trained_tokens = trained_tokens  # this run's count; the ledger bills only beyond its mark
        if row.status != "running":
            return row.status
        data: dict[str, Any] = {"step": step, "total_steps": total_steps, "trained_tokens": trained_tokens}
        data.update(metrics or {})  # the method's own (DPO: train_reward_margin, train_reward_accuracy)
        if train_loss is not None:
            data["train_loss"] = train_loss
        if valid_loss is not None:
            data["valid_loss"] = valid_loss
        loss = f", train loss {train_loss:.4f}" if train_loss is not None else ""
        jobs.add_event(session, row, f"Step {step}/{total_steps}{loss}", type="metrics", data=data)
        cap = jobs.plan_terms(session, row.key_id).monthly_training_tokens
        if cap is not None:
            used = billing.month_tokens(session, row.key_id, time.time())
            if used + max(0, row.trained_tokens - row.billed_tokens) > cap:
                return "quota"
        return None


def checkpoint(
    sessions: sessionmaker,
    job: Claimed,
    *,
    step: int,
    path: str,
    trained_tokens: int,
    metrics: dict[str, float],
) -> bool:
    """Stores a checkpoint (once per step) and bills the tokens trained so far."""
    with sessions() as session, session.begin():
        row = _mine(session, job)
        if row is None:
            return False
        known = session.scalar(
            select(FinetuneCheckpoint.id).where(
                FinetuneCheckpoint.job == row.id, FinetuneCheckpoint.step == step
            )
        )
        if known is None:
            session.add(
                FinetuneCheckpoint(job=row.id, step=step, path=path, metrics=metrics, created_at=time.time())
            )
            jobs.add_event(session, row, f"Checkpoint created at step {step}", data={"step": step})
        row.step, row.trained_tokens = step, trained_tokens
        billing.bill(session, row)
        return True


def succeed(
    sessions: sessionmaker, job: Claimed, *, adapter_dir: str, trained_tokens: int, steps: int
) -> str | None:
    """running -> succeeded with the `ft:` model; bills the rest. Returns the model name, or None when the job
    is no longer this worker's or was cancelled meanwhile (then it is settled as cancelled)."""
    with sessions() as session, session.begin():
        row = _mine(session, job)
        if row is None:
            return None
        row.claim, row.heartbeat_at, row.step, row.trained_tokens = None, None, steps, trained_tokens
        if row.status != "running":
            billing.bill(session, row)
            return None
        org_name = session.scalar(select(Organization.name).where(Organization.id == row.org_id)) or "org"
        row.status, row.finished_at = "succeeded", time.time()
        row.fine_tuned_model, row.adapter_dir = jobs.model_name(row, org_name), adapter_dir
        billing.bill(session, row)
        jobs.add_event(session, row, f"New fine-tuned model created: {row.fine_tuned_model}")
        jobs.add_event(session, row, "The job has successfully completed")
        return row.fine_tuned_model


def fail(
    sessions: sessionmaker,
    job: Claimed,
    code: str,
    message: str,
    param: str | None = None,
    trained_tokens: int | None = None,
) -> None:
    """-> failed with OpenAI's error object; bills what was trained."""
    with sessions() as session, session.begin():
        row = _mine(session, job)
        if row is None:
            return
        row.claim, row.heartbeat_at = None, None
        if trained_tokens is not None:
            row.trained_tokens = trained_tokens
        billing.bill(session, row)
        if row.status in jobs.FINAL:
            return  # cancelled meanwhile: that stays the outcome
        row.status, row.finished_at = "failed", time.time()
        row.error = {"code": code, "message": message, "param": param}
        jobs.add_event(session, row, message, level="error")


def release(sessions: sessionmaker, job: Claimed, trained_tokens: int | None = None) -> None:
    """The worker stops without an outcome (cancelled, or the worker is shutting down): a cancelled job is
    settled, a running one goes back to the queue and resumes from its last checkpoint on the next start."""
    with sessions() as session, session.begin():
        row = _mine(session, job)
        if row is None:
            return
        row.claim, row.heartbeat_at = None, None
        if trained_tokens is not None:
            row.trained_tokens = trained_tokens
        if row.status == "cancelled":
            billing.bill(session, row)
        elif row.status == "running":
            row.status, row.attempts = "queued", max(0, row.attempts - 1)
            jobs.add_event(
                session, row, "Worker stopped; the job is queued again and resumes from its last checkpoint"
            )


def requeue_lost(sessions: sessionmaker, stale_seconds: float, max_attempts: int) -> int:
    """Jobs whose worker's heartbeat is older than `stale_seconds`: validation is retried; training is
    queued again to resume from the last checkpoint, or failed once it was started `max_attempts` times; a
    job cancelled under a dead worker is settled. Returns how many jobs were taken back."""
    with sessions() as session, session.begin():
        now = _db_now(session)
        lost = list(
            session.scalars(
                select(FinetuneJob)
                .where(FinetuneJob.claim.is_not(None), FinetuneJob.heartbeat_at < now - stale_seconds)
                .with_for_update(skip_locked=True)
            )
        )
        for row in lost:
            _settle_lost(
                session,
                row,
                max_attempts,
                failed=f"the worker running this job stopped responding {row.attempts} times; the job failed",
                queued="The worker stopped responding; the job is queued again and resumes from its last "
                "checkpoint",
            )
        return len(lost)


def _settle_lost(session: Session, row: FinetuneJob, max_attempts: int, failed: str, queued: str) -> None:
    """A job whose trainer is gone: failed with `worker_lost` once started `max_attempts` times, else queued
    again to resume from its last checkpoint; a job that reached a final state meanwhile is billed."""
    row.claim, row.heartbeat_at = None, None
    if row.status == "running" and row.attempts >= max_attempts:
        row.status, row.finished_at = "failed", time.time()
        row.error = {"code": "worker_lost", "message": failed, "param": None}
        jobs.add_event(session, row, failed, level="error")
        billing.bill(session, row)
    elif row.status == "running":
        row.status = "queued"
        jobs.add_event(session, row, queued, level="warn")
    elif row.status in jobs.FINAL:
        billing.bill(session, row)


def lost(sessions: sessionmaker, job: Claimed, max_attempts: int, why: str) -> None:
    """The trainer of a running job was lost while its worker lives (a pool node died under it): the job is
    queued again to resume from its last checkpoint, or failed with `worker_lost` once it was started
    `max_attempts` times, as `requeue_lost` does for a silent worker; a job cancelled meanwhile is settled."""
    with sessions() as session, session.begin():
        row = _mine(session, job)
        if row is None:
            return
        _settle_lost(
            session,
            row,
            max_attempts,
            failed=f"{why}; the job was started {row.attempts} times and failed",
            queued=f"{why}; the job is queued again and resumes from its last checkpoint",
        )
