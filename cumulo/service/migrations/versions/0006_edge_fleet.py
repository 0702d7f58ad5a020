"""The edge fleet, second step: each device's last good model and refused-message counts, image requests to
devices, and webhooks with the deliveries owed to them.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("edge_devices") as batch:
        batch.add_column(sa.Column("good_model", sa.JSON, nullable=True))
        batch.add_column(sa.Column("refused", sa.JSON, nullable=True))
    op.create_table(
        "edge_requests",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("device", sa.Integer, sa.ForeignKey("edge_devices.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(256), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("published_at", sa.Float, nullable=True),
        sa.Column("answered_at", sa.Float, nullable=True),
        sa.Column("image", sa.LargeBinary, nullable=True),
    )
    op.create_index("ix_edge_requests_org_id", "edge_requests", ["org_id"])
    op.create_table(
        "edge_webhooks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("webhook_id", sa.String(64), nullable=False, unique=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("kinds", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("deleted_at", sa.Float, nullable=True),
    )
    op.create_index("ix_edge_webhooks_org_id", "edge_webhooks", ["org_id"])
    op.create_table(
        "edge_deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("webhook", sa.Integer, sa.ForeignKey("edge_webhooks.id"), nullable=False),
        sa.Column("result", sa.Integer, sa.ForeignKey("edge_results.id"), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_at", sa.Float, nullable=True),
        sa.Column("delivered_at", sa.Float, nullable=True),
        sa.Column("last_error", sa.String(512), nullable=True),
        sa.UniqueConstraint("webhook", "result", name="uq_edge_deliveries_webhook_result"),
    )
    op.create_index("ix_edge_deliveries_next_at", "edge_deliveries", ["next_at"])


def downgrade() -> None:
    op.drop_index("ix_edge_deliveries_next_at", table_name="edge_deliveries")
    op.drop_table("edge_deliveries")
    op.drop_index("ix_edge_webhooks_org_id", table_name="edge_webhooks")
    op.drop_table("edge_webhooks")
    op.drop_index("ix_edge_requests_org_id", table_name="edge_requests")
    op.drop_table("edge_requests")
    with op.batch_alter_table("edge_devices") as batch:
        batch.drop_column("refused")
        batch.drop_column("good_model")
