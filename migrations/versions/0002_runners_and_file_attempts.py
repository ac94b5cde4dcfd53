"""runners seen by the API; the attempt that uploaded each runner file

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 06:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("runners",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("name", sa.String(length=200), nullable=False),
    sa.Column("runner_token_id", sa.Integer(), nullable=True),
    sa.Column("mode", sa.Enum("create", "finetune", name="mode", native_enum=False, length=16, create_constraint=True), nullable=False),
    sa.Column("type", sa.Enum("text", "image", name="sessiontype", native_enum=False, length=16, create_constraint=True), nullable=False),
    sa.Column("model_name", sa.String(length=500), nullable=False),
    sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["runner_token_id"], ["runner_tokens.id"], ondelete="SET NULL"),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("name")
    )
    with op.batch_alter_table("runners", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_runners_last_seen_at"), ["last_seen_at"], unique=False)
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_column("attempt")
    with op.batch_alter_table("runners", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runners_last_seen_at"))
    op.drop_table("runners")
