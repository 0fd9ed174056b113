"""per-organisation limits (quotas and inference rate)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 14:25:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("organizations") as batch:
        batch.add_column(sa.Column("max_active_jobs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_storage_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("inference_rpm", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("organizations") as batch:
        batch.drop_column("inference_rpm")
        batch.drop_column("max_storage_bytes")
        batch.drop_column("max_active_jobs")
