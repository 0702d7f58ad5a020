"""Fine-tuning (issue #14): uploaded files, jobs with their queue index, events, checkpoints, and the
fine-tuning terms of plans (priority, running jobs, monthly training tokens, price per training token).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "finetune_plans",
        sa.Column("plan_id", sa.Integer, sa.ForeignKey("plans.id"), primary_key=True),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("max_jobs", sa.Integer, nullable=True),
        sa.Column("monthly_training_tokens", sa.BigInteger, nullable=True),
        sa.Column("price_training", sa.Float, nullable=False),
    )
    op.create_table(
        "files",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("file_id", sa.String(64), nullable=False, unique=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(256), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("deleted_at", sa.Float, nullable=True),
    )
    op.create_index("ix_files_org_id", "files", ["org_id"])
    op.create_table(
        "finetune_jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.String(64), nullable=False, unique=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64), nullable=True),
        sa.Column("method", sa.JSON, nullable=False),
        sa.Column("hyperparameters", sa.JSON, nullable=False),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=True),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("n_examples", sa.Integer, nullable=True),
        sa.Column("n_train_tokens", sa.BigInteger, nullable=True),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("total_steps", sa.Integer, nullable=True),
        sa.Column("trained_tokens", sa.BigInteger, nullable=False),
        sa.Column("billed_tokens", sa.BigInteger, nullable=False),
        sa.Column("fine_tuned_model", sa.String(512), nullable=True),
        sa.Column("adapter_dir", sa.String(1024), nullable=True),
        sa.Column("claim", sa.String(64), nullable=True),
        sa.Column("heartbeat_at", sa.Float, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    op.create_index("ix_finetune_jobs_org_id", "finetune_jobs", ["org_id"])
    op.create_index("ix_finetune_jobs_key_id", "finetune_jobs", ["key_id"])
    op.create_index("ix_finetune_jobs_queue", "finetune_jobs", ["status", "priority", "created_at"])
    op.create_table(
        "finetune_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job", sa.Integer, sa.ForeignKey("finetune_jobs.id"), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.JSON, nullable=True),
    )
    op.create_index("ix_finetune_events_job", "finetune_events", ["job"])
    op.create_table(
        "finetune_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job", sa.Integer, sa.ForeignKey("finetune_jobs.id"), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("job", "step", name="uq_finetune_checkpoints_job_step"),
    )
    op.create_index("ix_finetune_checkpoints_job", "finetune_checkpoints", ["job"])


def downgrade() -> None:
    op.drop_table("finetune_checkpoints")
    op.drop_table("finetune_events")
    op.drop_table("finetune_jobs")
    op.drop_table("files")
    op.drop_table("finetune_plans")
