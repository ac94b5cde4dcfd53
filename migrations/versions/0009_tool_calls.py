"""tool calls: the function calls of assistant replies, and the results sent back

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 18:00:00

- tool_calls: one row per call an assistant reply made (its place in the reply, OpenAI's call id, the
  function's name and its arguments as JSON text), with the `tool` message that answered it, if any.
  Written when a runner completes a reply that calls tools, and for the earlier calls of a /v1 chat.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tool_calls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("interaction_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("arguments", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["interaction_id"], ["interactions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("tool_calls", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tool_calls_session_id"), ["session_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_tool_calls_interaction_id"), ["interaction_id"], unique=False)


def downgrade() -> None:
    op.drop_table("tool_calls")
