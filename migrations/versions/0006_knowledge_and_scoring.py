"""knowledge bases with the database's own full-text search; sessions name them; the `score` task mode

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 12:00:00

Full-text search is each database's own, so it is made here in SQL rather than in the models: on
SQLite an FTS5 table over the chunks' text (external content, kept in step by triggers, ranked by
bm25), on PostgreSQL a stored generated column `search` = `to_tsvector('english', text)` with a GIN
index (ranked by ts_rank).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_OLD_MODES = ("create", "finetune")
_NEW_MODES = ("create", "finetune", "score")
_MODE_TABLES = ("sessions", "tasks", "runners", "task_usage")

_SQLITE_SEARCH = [
    "CREATE VIRTUAL TABLE knowledge_fts USING fts5(text, content='knowledge_chunks', content_rowid='id', "
    "tokenize='porter unicode61')",
    "CREATE TRIGGER knowledge_chunks_ai AFTER INSERT ON knowledge_chunks BEGIN "
    "INSERT INTO knowledge_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER knowledge_chunks_ad AFTER DELETE ON knowledge_chunks BEGIN "
    "INSERT INTO knowledge_fts(knowledge_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
    "CREATE TRIGGER knowledge_chunks_au AFTER UPDATE ON knowledge_chunks BEGIN "
    "INSERT INTO knowledge_fts(knowledge_fts, rowid, text) VALUES ('delete', old.id, old.text); "
    "INSERT INTO knowledge_fts(rowid, text) VALUES (new.id, new.text); END",
]
# Stored, not an expression index: ranking reads the tsvector of every match, and recomputing it from
# the text cost 40x the whole query (bench.seeds: p50 352 ms over 10,000 chunks, 8 ms stored).
_POSTGRES_SEARCH = [
    "ALTER TABLE knowledge_chunks ADD COLUMN search tsvector "
    "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED",
    "CREATE INDEX ix_knowledge_chunks_search ON knowledge_chunks USING gin (search)",
]


def _mode(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, name="mode", native_enum=False, create_constraint=True, length=16)


def _set_modes(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name == "postgresql":
        listed = ", ".join(f"'{m}'" for m in new)
        for table in _MODE_TABLES:
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT mode")
            op.execute(f"ALTER TABLE {table} ADD CONSTRAINT mode CHECK (mode IN ({listed}))")
        return
    for table in _MODE_TABLES:  # SQLite: the table is rebuilt with the new CHECK
        with op.batch_alter_table(table, recreate="always") as batch_op:
            batch_op.alter_column("mode", existing_type=_mode(old), type_=_mode(new), existing_nullable=False)


def upgrade() -> None:
    op.create_table("knowledge_bases",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("user_id", sa.Integer(), nullable=False),
    sa.Column("name", sa.String(length=200), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("knowledge_bases", schema=None) as batch_op:
        batch_op.create_index("ix_knowledge_bases_user_id_id", ["user_id", "id"], unique=False)
    op.create_table("knowledge_documents",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("knowledge_base_id", sa.Integer(), nullable=False),
    sa.Column("name", sa.String(length=255), nullable=False),
    sa.Column("size", sa.Integer(), nullable=False),
    sa.Column("sha256", sa.String(length=64), nullable=False),
    sa.Column("chunks", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["knowledge_base_id"], ["knowledge_bases.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("knowledge_documents", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_knowledge_documents_knowledge_base_id"), ["knowledge_base_id"],
                              unique=False)
    op.create_table("knowledge_chunks",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("knowledge_base_id", sa.Integer(), nullable=False),
    sa.Column("document_id", sa.Integer(), nullable=False),
    sa.Column("ordinal", sa.Integer(), nullable=False),
    sa.Column("text", sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(["document_id"], ["knowledge_documents.id"], ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["knowledge_base_id"], ["knowledge_bases.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id")
    )
    with op.batch_alter_table("knowledge_chunks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_knowledge_chunks_document_id"), ["document_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_knowledge_chunks_knowledge_base_id"), ["knowledge_base_id"],
                              unique=False)
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("knowledge_bases", sa.JSON(), nullable=False, server_default="[]"))
    for statement in _SQLITE_SEARCH if op.get_bind().dialect.name == "sqlite" else _POSTGRES_SEARCH:
        op.execute(statement)
    _set_modes(_OLD_MODES, _NEW_MODES)


def downgrade() -> None:
    for table in ("task_usage", "tasks", "runners"):
        op.execute(f"DELETE FROM {table} WHERE mode = 'score'")
    _set_modes(_NEW_MODES, _OLD_MODES)
    if op.get_bind().dialect.name == "sqlite":
        for trigger in ("knowledge_chunks_ai", "knowledge_chunks_ad", "knowledge_chunks_au"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute("DROP TABLE IF EXISTS knowledge_fts")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("knowledge_bases")
    op.drop_table("knowledge_chunks")
    op.drop_table("knowledge_documents")
    op.drop_table("knowledge_bases")
