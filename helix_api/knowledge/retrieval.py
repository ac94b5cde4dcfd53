"""Retrieval over a user's documents with the database's own full-text search, and the context it gives a turn.

Documents are split into chunks of about `chunk_chars` characters (paragraphs kept whole where they
fit, with `chunk_overlap` characters repeated across a cut). A turn's question becomes an OR of its
words; SQLite ranks the matches with FTS5's bm25, PostgreSQL with ts_rank over the GIN-indexed
stored column `search` = `to_tsvector('english', text)` (see migration 0006). The best `top_k` chunks, within
`max_context_chars`, go to the model in a system message, and the reply lists them as its sources.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session as DBSession

# Words too common to say anything about which chunk answers; the rest of the question is searched for.
_STOP_WORDS = frozenset(
    "a an and are as at be by can did do does for from had has have how i in is it its me my of on or so "
    "that the their them then there these they this to was we were what when where which who whom whose "
    "why will with would you your about tell please".split())
_WORD = re.compile(r"[^\W_]+")
MAX_TERMS = 32


@dataclass(frozen=True)
class RetrievalSettings:
    """How documents are chunked and how much of them a turn may carry (HELIX_KNOWLEDGE_* settings)."""

    chunk_chars: int = 1000
    chunk_overlap: int = 150
    top_k: int = 4
    max_context_chars: int = 4000
    max_document_bytes: int = 5 * 1024**2

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> RetrievalSettings:
        """The app's knowledge settings."""
        return cls(chunk_chars=int(settings["KNOWLEDGE_CHUNK_CHARS"]),
                   chunk_overlap=int(settings["KNOWLEDGE_CHUNK_OVERLAP"]),
                   top_k=int(settings["KNOWLEDGE_TOP_K"]),
                   max_context_chars=int(settings["KNOWLEDGE_MAX_CONTEXT_CHARS"]),
                   max_document_bytes=int(settings["KNOWLEDGE_MAX_DOCUMENT_BYTES"]))


@dataclass(frozen=True)
class Hit:
    """A chunk that matched a question, best first."""

    chunk_id: int
    knowledge_base_id: int
    document_id: int
    document: str
    chunk: int
    text: str
    score: float


@dataclass(frozen=True)
class Grounding:
    """What retrieval adds to a turn: the system message for the model and the sources for the reply."""

    system: str
    sources: list[dict[str, Any]]


def chunk(document: str, size: int, overlap: int) -> list[str]:
    """`document` in pieces of at most `size` characters: whole paragraphs where they fit, long ones cut
    at a space with `overlap` characters repeated, so a sentence cut in two is whole in one of them."""
    pieces: list[str] = []
    current = ""
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", document)):
        if not paragraph:
            continue
        if current and len(current) + 2 + len(paragraph) <= size:
            current = f"{current}\n\n{paragraph}"
            continue
        if current:
            pieces.append(current)
        current = ""
        while len(paragraph) > size:
            cut = paragraph.rfind(" ", size // 2, size)
            cut = cut if cut > 0 else size
            pieces.append(paragraph[:cut].strip())
            back = paragraph.rfind(" ", max(0, cut - overlap), cut) if overlap else -1
            paragraph = paragraph[(back + 1 if back > 0 else cut):].strip()
        current = paragraph
    if current:
        pieces.append(current)
    return pieces


def terms(question: str) -> list[str]:
    """The words of a question worth searching for, lower-case, each once, in order."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(question.lower()):
        if word not in _STOP_WORDS and (len(word) > 1 or word.isdigit()):
            seen.setdefault(word, None)
    return list(seen)[:MAX_TERMS]


def _dialect(db: Connection | DBSession) -> str:
    bind = db if isinstance(db, Connection) else db.get_bind()
    return bind.dialect.name


_SQLITE = """
SELECT c.id, c.knowledge_base_id, c.document_id, d.name, c.ordinal, c.text, bm25(knowledge_fts) AS rank
FROM knowledge_fts
JOIN knowledge_chunks c ON c.id = knowledge_fts.rowid
JOIN knowledge_documents d ON d.id = c.document_id
WHERE knowledge_fts MATCH :query AND c.knowledge_base_id IN ({ids})
ORDER BY rank LIMIT :limit
"""
_POSTGRES = """
SELECT c.id, c.knowledge_base_id, c.document_id, d.name, c.ordinal, c.text,
       ts_rank(c.search, q.query) AS rank
FROM knowledge_chunks c
JOIN knowledge_documents d ON d.id = c.document_id,
     to_tsquery('english', :query) AS q(query)
WHERE c.search @@ q.query AND c.knowledge_base_id IN ({ids})
ORDER BY rank DESC, c.id LIMIT :limit
"""


def search(db: Connection | DBSession, knowledge_base_ids: Sequence[int], question: str,
           limit: int) -> list[Hit]:
    """The chunks of these knowledge bases that best match `question`, best first (none: no useful words)."""
    words = terms(question)
    ids = [int(i) for i in knowledge_base_ids]
    if not words or not ids or limit <= 0:
        return []
    listed = ", ".join(str(i) for i in ids)  # ints, made so above: safe to inline
    if _dialect(db) == "postgresql":
        sql, query = _POSTGRES.format(ids=listed), " | ".join(words)  # words are letters and digits only
    else:
        sql, query = _SQLITE.format(ids=listed), " OR ".join(f'"{w}"' for w in words)
    rows = db.execute(text(sql), {"query": query, "limit": limit})
    # bm25 is better when lower (negative); ts_rank when higher: scores are shown higher-is-better.
    flip = -1.0 if _dialect(db) != "postgresql" else 1.0
    return [Hit(chunk_id=r[0], knowledge_base_id=r[1], document_id=r[2], document=r[3], chunk=r[4], text=r[5],
                score=round(flip * float(r[6]), 6)) for r in rows]


def ground(db: Connection | DBSession, knowledge_base_ids: Sequence[int], question: str,
           settings: RetrievalSettings) -> Grounding | None:
    """The context for a turn asking `question`, or None when nothing in the knowledge bases matches."""
    hits = search(db, knowledge_base_ids, question, settings.top_k)
    kept: list[Hit] = []
    used = 0
    for hit in hits:
        if kept and used + len(hit.text) > settings.max_context_chars:
            break
        kept.append(hit)
        used += len(hit.text)
    if not kept:
        return None
    passages = "\n\n".join(f"[{n}] {h.document} (chunk {h.chunk}):\n{h.text[:settings.max_context_chars]}"
                           for n, h in enumerate(kept, 1))
    system = ("Answer the user's question using the following excerpts from their documents. "
              "If they do not contain the answer, say so.\n\n" + passages)
    sources = [{"knowledge_base_id": h.knowledge_base_id, "document_id": h.document_id, "document": h.document,
                "chunk": h.chunk, "chunk_id": h.chunk_id, "score": h.score} for h in kept]
    return Grounding(system=system, sources=sources)


def with_context(messages: list[dict[str, str]], grounding: Grounding | None) -> list[dict[str, str]]:
    """The conversation with the retrieved context in its system message (added first, or put before
    the one there is), where every chat template expects the instructions."""
    if grounding is None:
        return messages
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": f"{messages[0]['content']}\n\n{grounding.system}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": grounding.system}, *messages]
