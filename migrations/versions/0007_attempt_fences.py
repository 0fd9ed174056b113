"""job_attempts.last_write_at (an attempt's last fenced write: when a lost one really ended) and
job_attempts.checkpoint_step (where a lost attempt was lost: the poison-job rule)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_attempts") as batch:
        batch.add_column(sa.Column("last_write_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("checkpoint_step", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_attempts") as batch:
        batch.drop_column("checkpoint_step")
        batch.drop_column("last_write_at")
