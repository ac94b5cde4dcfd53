"""The SQL recipes in notes.md run on PostgreSQL against the real schema, so they never rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

NOTES = Path(__file__).resolve().parent.parent / "notes.md"


def _recipes() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", NOTES.read_text(), flags=re.S)
    return [statement.strip() for block in blocks for statement in block.split(";") if statement.strip()]


def test_notes_has_recipes():
    assert len(_recipes()) >= 6


@pytest.mark.postgres
@pytest.mark.parametrize("statement", _recipes(), ids=lambda s: " ".join(s.split())[:40])
def test_recipe_runs(postgres_migrated, statement):
    engine = create_engine(postgres_migrated)
    with engine.connect() as conn:
        conn.execute(text(statement))
    engine.dispose()
