"""task usage: what each attempt at a task used, for users' bills and operators' costs

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02 09:00:00

One row per attempt's end (complete, failed, dead, cancelled, retried, released): who it was for,
the model, the runner's token counts, images made and runner seconds. Tasks finished before this
revision have no rows: their usage stays in `tasks.result -> 'usage'`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("task_usage",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("task_id", sa.Integer(), nullable=True),
    sa.Column("session_id", sa.Integer(), nullable=True),
    sa.Column("user_id", sa.Integer(), nullable=False),
    sa.Column("mode", sa.Enum("create", "finetune", name="mode", native_enum=False, length=16, create_constraint=True), nullable=False),
    sa.Column("type", sa.Enum("text", "image", name="sessiontype", native_enum=False, length=16, create_constraint=True), nullable=False),
    sa.Column("model_name", sa.String(length=500), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("outcome", sa.Enum("complete", "failed", "dead", "cancelled", "retried", "released", name="attemptend", native_enum=False, length=16, create_constraint=True), nullable=False),
    sa.Column("billed", sa.Boolean(), nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
    sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
    sa.Column("images", sa.Integer(), nullable=False),
    sa.Column("runner_seconds", sa.Float(), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="SET NULL"),
    sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="SET NULL"),
    sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("task_usage", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_task_usage_task_id"), ["task_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_task_usage_finished_at"), ["finished_at"], unique=False)
        batch_op.create_index("ix_task_usage_user_finished", ["user_id", "finished_at"], unique=False)


def downgrade() -> None:
    op.drop_table("task_usage")
