"""Edge devices keep their class (a chip id of the catalog, e.g. imx500), so a rollout can be checked for fit.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("edge_devices", sa.Column("device_class", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("edge_devices") as batch:
        batch.drop_column("device_class")
