"""jobs.method_type: OpenAI's method type of a job, "supervised" or "dpo" (a dpo job's beta is in its hyperparameters)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 08:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # every job before this revision was supervised: the server default says so for the rows already there
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("method_type", sa.String(16), nullable=False, server_default="supervised"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("method_type")
