"""Knowledge bases a user owns: making them, adding documents (checked, then chunked), listing them.

Every document of a request is checked before anything is stored: text or Markdown, UTF-8, not
empty, not binary, within the size limit. A problem is a 400 `invalid_document` naming each file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import IO, Any, Protocol

from sqlalchemy import Connection, func, insert, select
from sqlalchemy.orm import Session as DBSession

from helix_api.db import Database
from helix_api.errors import InvalidDocument, InvalidField, KnowledgeBaseNotFound
from helix_api.knowledge.retrieval import RetrievalSettings, chunk
from helix_api.models import KnowledgeBase, KnowledgeChunk, KnowledgeDocument, utcnow
from helix_api.sessions.storage import safe_name

SUFFIXES = (".txt", ".md", ".markdown", ".text")
MAX_PROBLEMS = 20
_KBS, _DOCS, _CHUNKS = KnowledgeBase.__table__, KnowledgeDocument.__table__, KnowledgeChunk.__table__
# Control characters other than tab, newline, carriage return and form feed: text has (almost) none.
_CONTROL = frozenset(range(32)) - {9, 10, 12, 13}


class Upload(Protocol):
    """An uploaded file: werkzeug's FileStorage fits."""

    filename: str | None
    stream: IO[bytes]


def _kb_json(row: Any, documents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": row.id, "name": row.name, "created_at": row.created_at.isoformat()}
    if documents is not None:
        body["documents"] = documents
    return body


def _doc_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "knowledge_base_id": row.knowledge_base_id, "name": row.name, "size": row.size,
            "sha256": row.sha256, "chunks": row.chunks, "created_at": row.created_at.isoformat()}


def create(database: Database, user_id: int, name: Any) -> dict[str, Any]:
    """A new, empty knowledge base of the user's."""
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidField("Field 'name' must be a non-empty string of at most 200 characters.", field="name")
    with database.transaction() as conn:
        row = conn.execute(insert(_KBS).returning(*_KBS.c),
                           {"user_id": user_id, "name": name.strip(), "created_at": utcnow()}).one()
        return _kb_json(row, [])


def listing(database: Database, user_id: int) -> list[dict[str, Any]]:
    """The user's knowledge bases, newest first, with how many documents each holds."""
    counts = select(_DOCS.c.knowledge_base_id, func.count().label("n")).group_by(_DOCS.c.knowledge_base_id).subquery()
    with database.connect() as conn:
        rows = conn.execute(select(_KBS, func.coalesce(counts.c.n, 0).label("documents"))
                            .outerjoin(counts, counts.c.knowledge_base_id == _KBS.c.id)
                            .where(_KBS.c.user_id == user_id).order_by(_KBS.c.id.desc()))
        return [{**_kb_json(r), "document_count": r.documents} for r in rows]


def owned(db: Connection | DBSession, user_id: int, ids: Sequence[int]) -> list[Any]:
    """The user's knowledge bases with these ids; someone else's is as good as missing (404)."""
    wanted = list(dict.fromkeys(ids))
    rows = {r.id: r for r in db.execute(select(_KBS).where(_KBS.c.id.in_(wanted), _KBS.c.user_id == user_id))}
    for kb_id in wanted:
        if kb_id not in rows:
            raise KnowledgeBaseNotFound(f"No knowledge base {kb_id}.", field="knowledge")
    return [rows[i] for i in wanted]


def parse_ids(value: Any, name: str = "knowledge") -> list[int]:
    """A list of knowledge base ids from a request field (absent: none)."""
    if value is None:
        return []
    if (not isinstance(value, list) or len(value) > 16
            or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in value)):
        raise InvalidField(f"Field {name!r} must be a list of up to 16 knowledge base ids.", field=name)
    return list(dict.fromkeys(value))


def shown(database: Database, user_id: int, kb_id: int) -> dict[str, Any]:
    """One of the user's knowledge bases with its documents."""
    with database.connect() as conn:
        [kb] = owned(conn, user_id, [kb_id])
        return _kb_json(kb, documents(conn, kb_id))


def documents(conn: Connection, kb_id: int) -> list[dict[str, Any]]:
    """The documents of a knowledge base, oldest first."""
    return [_doc_json(r) for r in conn.execute(select(_DOCS).where(_DOCS.c.knowledge_base_id == kb_id)
                                               .order_by(_DOCS.c.id))]


def document_list(database: Database, user_id: int, kb_id: int) -> list[dict[str, Any]]:
    """The documents of one of the user's knowledge bases."""
    with database.connect() as conn:
        owned(conn, user_id, [kb_id])
        return documents(conn, kb_id)


def _problem(upload: Upload, max_bytes: int) -> tuple[str | None, str]:
    """(why the upload is not a usable document or None, its text)."""
    name = upload.filename or "upload"
    if not name.lower().endswith(SUFFIXES):
        return f"not a text or Markdown file (allowed: {', '.join(SUFFIXES)})", ""
    upload.stream.seek(0)
    raw = upload.stream.read(max_bytes + 1)
    upload.stream.seek(0)
    if len(raw) > max_bytes:
        return f"over the limit of {max_bytes} bytes", ""
    if b"\x00" in raw:
        return "binary data (NUL bytes), not text", ""
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte {exc.start} cannot be decoded)", ""
    if not content.strip():
        return "the document is empty", ""
    controls = sum(1 for ch in content if ord(ch) in _CONTROL)
    if controls > max(2, len(content) // 100):  # text may carry a stray escape, not a binary format's bytes
        return f"binary data ({controls} control characters), not text", ""
    return None, content


def add_documents(database: Database, user_id: int, kb_id: int, uploads: list[Upload],
                  settings: RetrievalSettings) -> list[dict[str, Any]]:
    """Check every upload, then store each as a document with its chunks; InvalidDocument names each bad one."""
    with database.connect() as conn:
        owned(conn, user_id, [kb_id])
    problems: list[dict[str, str]] = []
    texts: list[tuple[str, str, bytes]] = []
    if not uploads:
        problems.append({"file": "files", "message": "no documents were uploaded (send them in the 'files' field)"})
    for upload in uploads:
        why, content = _problem(upload, settings.max_document_bytes)
        if why:
            problems.append({"file": upload.filename or "upload", "message": why})
        else:
            texts.append((safe_name(upload.filename or "document.txt"), content, content.encode()))
    if problems:
        shown_problems = problems[:MAX_PROBLEMS]
        listed = "; ".join(f"{p['file']}: {p['message']}" for p in shown_problems)
        raise InvalidDocument(f"The documents have problems: {listed}", field="files", problems=shown_problems)
    added = []
    with database.transaction() as conn:
        owned(conn, user_id, [kb_id])
        for name, content, raw in texts:
            pieces = chunk(content, settings.chunk_chars, settings.chunk_overlap)
            doc = conn.execute(insert(_DOCS).returning(*_DOCS.c), {
                "knowledge_base_id": kb_id, "name": name, "size": len(raw),
                "sha256": hashlib.sha256(raw).hexdigest(), "chunks": len(pieces), "created_at": utcnow()}).one()
            conn.execute(insert(_CHUNKS), [{"knowledge_base_id": kb_id, "document_id": doc.id, "ordinal": i,
                                            "text": piece} for i, piece in enumerate(pieces)])
            added.append(_doc_json(doc))
    return added
