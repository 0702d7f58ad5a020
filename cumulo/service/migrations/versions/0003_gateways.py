"""Gateways sharing the database: one heartbeat row per live gateway, and an index of the usage rows still in
progress (recovery reads them every few seconds; a full scan of the ledger would grow with it).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateways",
        sa.Column("id", sa.String(160), primary_key=True),  # the `gateway` of its usage rows
        sa.Column("started_at", sa.Float, nullable=False),  # the database's clock, epoch seconds
        sa.Column("last_seen", sa.Float, nullable=False),  # the database's clock at its last heartbeat
    )
    in_progress = sa.text("status = 'in_progress'")
    op.create_index(
        "ix_usage_in_progress",
        "usage",
        ["gateway"],
        postgresql_where=in_progress,
        sqlite_where=in_progress,
    )


def downgrade() -> None:
    op.drop_index("ix_usage_in_progress", table_name="usage")
    op.drop_table("gateways")
