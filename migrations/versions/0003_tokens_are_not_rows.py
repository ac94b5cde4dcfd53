"""tokens are not rows: drop token events, whose text every reply's output already holds

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 11:40:00

Token events now live in memory while a reply is written and reach the reply's `output`; event
streams replay a reply's text from there. Token rows stored before would be replayed twice.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM task_events WHERE kind = 'token'")


def downgrade() -> None:
    # Nothing to restore: the text stays in each reply's output, and streams of the older code
    # replay that text's progress and state rows without it.
    pass
