"""the fleet's scheduling rules: warm routing, per-user limits, fine-tune reservations

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 14:15:00

- tasks.adapter / tasks.warm_until: a task's adapter key, and until when only a runner holding it may
  take the task (warm routing);
- users.max_queued / users.max_running: per-user overrides of the operator's limits;
- users.last_claimed_at: when a user's task was last claimed (fair shares' round robin);
- runners.pool: the model whose inference and fine-tuning a runner polls for together;
- reservations: runners kept for fine-tuning, per model;
- indexes for counting a user's tasks by status and a runner's active tasks.

Existing tasks get their adapter key from their input, so a queue that was waiting keeps its adapters.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapter", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("warm_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_tasks_user_status", ["user_id", "status"], unique=False)
        batch_op.create_index("ix_tasks_runner_status", ["runner", "status"], unique=False)
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_queued", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_running", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("last_claimed_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("runners", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pool", sa.String(length=500), nullable=True))
    op.create_table(
        "reservations",
        sa.Column("model_name", sa.String(length=500), nullable=False),
        sa.Column("runners", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_name"),
    )
    tasks = sa.table("tasks", sa.column("id", sa.Integer), sa.column("input", sa.JSON),
                     sa.column("status", sa.String), sa.column("adapter", sa.String))
    conn = op.get_bind()
    rows = conn.execute(sa.select(tasks.c.id, tasks.c.input).where(tasks.c.status == "queued")).all()
    for task_id, task_input in rows:
        ref = (task_input or {}).get("adapter") if isinstance(task_input, dict) else None
        if isinstance(ref, dict) and (ref.get("sha256") or ref.get("id")):
            conn.execute(tasks.update().where(tasks.c.id == task_id)
                         .values(adapter=str(ref.get("sha256") or ref.get("id"))[:128]))


def downgrade() -> None:
    op.drop_table("reservations")
    with op.batch_alter_table("runners", schema=None) as batch_op:
        batch_op.drop_column("pool")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("last_claimed_at")
        batch_op.drop_column("max_running")
        batch_op.drop_column("max_queued")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_runner_status")
        batch_op.drop_index("ix_tasks_user_status")
        batch_op.drop_column("warm_until")
        batch_op.drop_column("adapter")
