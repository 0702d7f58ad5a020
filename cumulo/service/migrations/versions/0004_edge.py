"""The edge fleet (issue #15): devices, their results (unique per device and sequence number), metered
messages and bytes per device and month, and rollouts with their history.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "edge_devices",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("token_expires_at", sa.Float, nullable=True),
        sa.Column("credential_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("enrolled_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("last_seen", sa.Float, nullable=True),
        sa.Column("reported", sa.JSON, nullable=True),
        sa.Column("desired_model", sa.JSON, nullable=True),
        sa.Column("desired_config", sa.JSON, nullable=True),
        sa.Column("desired_rollout", sa.Integer, nullable=True),
        sa.Column("desired_revision", sa.Integer, nullable=False),
        sa.Column("published_revision", sa.Integer, nullable=False),
    )
    op.create_index("ix_edge_devices_org_id", "edge_devices", ["org_id"])
    op.create_table(
        "edge_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("device", sa.Integer, sa.ForeignKey("edge_devices.id"), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("model", sa.JSON, nullable=True),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.UniqueConstraint("device", "seq", name="uq_edge_results_device_seq"),
    )
    op.create_index("ix_edge_results_org_time", "edge_results", ["org_id", "time"])
    op.create_index("ix_edge_results_device_time", "edge_results", ["device", "time"])
    op.create_table(
        "edge_usage",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("device", sa.Integer, sa.ForeignKey("edge_devices.id"), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("messages", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("device", "month", name="uq_edge_usage_device_month"),
    )
    op.create_index("ix_edge_usage_org_id", "edge_usage", ["org_id"])
    op.create_table(
        "edge_rollouts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("model", sa.JSON, nullable=False),
        sa.Column("previous_model", sa.JSON, nullable=True),
        sa.Column("canary_share", sa.Float, nullable=False),
        sa.Column("window_seconds", sa.Float, nullable=False),
        sa.Column("silence_seconds", sa.Float, nullable=False),
        sa.Column("canaries", sa.JSON, nullable=False),
        sa.Column("rest", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(512), nullable=True),
        sa.Column("history", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_edge_rollouts_org_id", "edge_rollouts", ["org_id"])


def downgrade() -> None:
    op.drop_table("edge_rollouts")
    op.drop_table("edge_usage")
    op.drop_table("edge_results")
    op.drop_table("edge_devices")
