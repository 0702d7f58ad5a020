"""Training tokens in the usage ledger, exactly once.

A job's `billed_tokens` is the high-water mark of what the ledger holds for it. Billing writes one usage row
(endpoint `fine_tuning`, the tokens in `prompt_tokens`) for the tokens trained beyond that mark, keyed
`<job id>:step-<N>`, and moves the mark, in one transaction under the job's row lock. A worker that resumes
from a checkpoint trains some steps again and reports lower counts than the mark: nothing is billed until it
passes the mark, so the tokens of a job are billed once whatever happened to its workers. Rows are written at
checkpoints and when a job ends (succeeded, failed or cancelled: what it trained), not per step.
"""

from __future__ import annotations

import time

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cumulo.service.db import ApiKey, Usage
from cumulo.service.finetune.tables import FinetuneJob, FinetunePlan
from cumulo.service.limits import month_of
from cumulo.service.metering import cost_nanos

ENDPOINT = "fine_tuning"


def month_tokens(session: Session, key_id: int, now: float) -> int:
    """Training tokens this key was billed in the calendar month of `now` (UTC)."""
    used = session.scalar(
        select(func.coalesce(func.sum(Usage.prompt_tokens), 0)).where(
            Usage.key_id == key_id, Usage.endpoint == ENDPOINT, Usage.month == month_of(now)
        )
    )
    return int(used or 0)


def price(session: Session, key_id: int) -> float:
    """USD per million training tokens in the key's plan (0 when the plan sets none)."""
    value = session.scalar(
        select(FinetunePlan.price_training)
        .join(ApiKey, ApiKey.plan_id == FinetunePlan.plan_id)
        .where(ApiKey.id == key_id)
    )
    return float(value or 0.0)


def bill(session: Session, job: FinetuneJob, now: float | None = None) -> int:
    """Bills `job.trained_tokens` beyond the mark; returns the tokens billed now (0 if none). The caller holds
    the job's row (SELECT ... FOR UPDATE on PostgreSQL; SQLite's transactions are serialized already)."""
    delta = job.trained_tokens - job.billed_tokens
    if delta <= 0:
        return 0
    now = time.time() if now is None else now
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    row = dialect.insert(Usage).values(
        request_id=f"{job.job_id}:step-{job.step}",
        key_id=job.key_id,
        org_id=job.org_id,
        endpoint=ENDPOINT,
        model=job.model,
        seal="",
        device="",
        gateway="",
        month=month_of(now),
        status="completed",
        prompt_tokens=delta,
        completion_tokens=0,
        cached_tokens=0,
        billed_tokens=delta,
        cost_nanos=cost_nanos(price(session, job.key_id), 0.0, delta, 0),
        started_at=now,
        finished_at=now,
        total_time=0.0,
    )
    written = session.execute(row.on_conflict_do_nothing(index_elements=["request_id"]).returning(Usage.id))
    if written.first() is None:
        return 0  # a row for this step exists already (a resumed run's counts drifted): the next step bills
    job.billed_tokens = job.trained_tokens
    return delta
