"""Deployments: the models the pool serves, with replica counts, format, chip and SLOs.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model", sa.String(256), nullable=False, unique=True),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("replicas", sa.Integer, nullable=False),
        sa.Column("min_replicas", sa.Integer, nullable=False),
        sa.Column("max_replicas", sa.Integer, nullable=False),
        sa.Column("format", sa.String(64), nullable=True),
        sa.Column("chip", sa.String(128), nullable=True),
        sa.Column("ttft_slo_ms", sa.Float, nullable=True),
        sa.Column("tpot_slo_ms", sa.Float, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deployments")
