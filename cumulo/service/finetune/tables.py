"""Tables of fine-tuning, on the service's `Base` so one migration history covers them (0005).

Public ids (`file-...`, `ftjob-...`) are random and unique; pages are cut by the integer row id. Times are
epoch seconds (float); a job's `heartbeat_at` is the database's clock, so workers on different hosts compare
it on one clock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from cumulo.service.db import Base


class FinetunePlan(Base):
    """Fine-tuning terms of a subscription plan; a plan without a row has the defaults (priority 0, no caps,
    free training). Kept beside `plans` rather than in it so the inference path never reads these columns."""

    __tablename__ = "finetune_plans"
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id"), primary_key=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher runs first
    max_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)  # running at once per key
    monthly_training_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # per key
    price_training: Mapped[float] = mapped_column(Float, default=0.0)  # USD per million training tokens


class StoredFile(Base):
    """An uploaded file: its bytes live under the data directory, its metadata here."""

    __tablename__ = "files"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(256))
    bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[float] = mapped_column(Float)
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class FinetuneJob(Base):
    """One fine-tuning job and where it stands: validating_files -> queued -> running -> succeeded | failed |
    cancelled. A worker owns a job while `claim` holds its token and keeps `heartbeat_at` fresh; a job whose
    heartbeat went stale is requeued (it resumes from its last checkpoint) or failed after `max_attempts`."""

    __tablename__ = "finetune_jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(256))  # the name the client gave
    source: Mapped[str] = mapped_column(String(1024))  # what the worker loads: catalog name, .gguf, directory
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"type": "supervised", "supervised": {...}}
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # as asked ("auto" kept) until resolved
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(24))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {"code", "message", "param"}
    priority: Mapped[int] = mapped_column(Integer, default=0)  # the plan's, when created
    n_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_train_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # per epoch
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    billed_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # the ledger's high-water mark
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    adapter_dir: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    claim: Mapped[str | None] = mapped_column(String(64), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times a worker started training it
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_finetune_jobs_queue", "status", "priority", "created_at"),)


class FinetuneEvent(Base):
    __tablename__ = "finetune_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[int] = mapped_column(ForeignKey("finetune_jobs.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(8))  # info | warn | error
    type: Mapped[str] = mapped_column(String(16))  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class FinetuneCheckpoint(Base):
    __tablename__ = "finetune_checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[int] = mapped_column(ForeignKey("finetune_jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)

    # A resumed worker passes a checkpoint's step again: it is the same checkpoint, stored once.
    __table_args__ = (UniqueConstraint("job", "step", name="uq_finetune_checkpoints_job_step"),)
