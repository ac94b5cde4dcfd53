"""runners say what they are: hardware, backend, kinds, slots, adapters, version, when they reported

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 05:00:00

Every column is nullable: a runner of the seed's protocol reports nothing, and its row shows only
what its polls tell (a name, one kind, a last-seen time).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_COLUMNS = ("hardware", "backend", "kinds", "slots_total", "slots_busy", "adapters", "version", "reported_at")


def upgrade() -> None:
    with op.batch_alter_table("runners", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hardware", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("backend", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("kinds", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("slots_total", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("slots_busy", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("adapters", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("version", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runners", schema=None) as batch_op:
        for column in reversed(_COLUMNS):
            batch_op.drop_column(column)
