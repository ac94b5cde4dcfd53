"""File records: uploads, outputs and adapters of a session, who may read them, and what a result keeps."""

from __future__ import annotations

import enum
import logging
from typing import Any

from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.orm import Session as DBSession

from helix_api.errors import FileNotFound, InvalidField
from helix_api.models import File, Interaction, InteractionState, Mode, utcnow
from helix_api.sessions.storage import FileStore, StoredBlob

logger = logging.getLogger(__name__)

_FILES = File.__table__
_INSERT_FILE = insert(_FILES).returning(*_FILES.c)


class FileKind(enum.StrEnum):
    """Why a file exists."""

    UPLOAD = "upload"  # as the user sent it (training data, captions)
    DATASET = "dataset"  # training data normalised by the API for the runner
    OUTPUT = "output"  # made by a runner for a reply (an image)
    ADAPTER = "adapter"  # a fine-tune's LoRA adapter, zipped


RUNNER_KINDS = (FileKind.OUTPUT, FileKind.ADAPTER)


def url_of(row: Any) -> str:
    """Where the owner downloads a file."""
    return f"/api/v1/sessions/{row.session_id}/files/{row.id}"


def file_json(row: Any) -> dict[str, Any]:
    """A file as its owner sees it."""
    return {"id": row.id, "name": row.name, "kind": row.kind, "size": row.size, "sha256": row.sha256,
            "content_type": row.content_type, "url": url_of(row)}


def file_ref(row: Any) -> dict[str, Any]:
    """A file as a runner is told of it (it fetches the bytes through the worker API)."""
    return {"id": row.id, "name": row.name, "kind": row.kind, "size": row.size, "sha256": row.sha256,
            "content_type": row.content_type}


def add(conn: DBSession | Connection, *, session_id: int, user_id: int, interaction_id: int | None,
        kind: FileKind, name: str, blob: StoredBlob, content_type: str, attempt: int | None = None) -> Any:
    """Record a stored blob as a file of a session; `attempt` is the task attempt that made it."""
    return conn.execute(_INSERT_FILE, {
        "session_id": session_id, "user_id": user_id, "interaction_id": interaction_id, "kind": kind.value,
        "name": name, "path": blob.key, "size": blob.size, "sha256": blob.sha256,
        "content_type": content_type, "attempt": attempt, "created_at": utcnow()}).one()


def owned(db: DBSession, user_id: int, session_id: int, file_id: int) -> File:
    """A file of the user's session; anyone else's is a 404."""
    row = db.scalar(select(File).where(File.id == file_id, File.session_id == session_id, File.user_id == user_id))
    if row is None:
        raise FileNotFound(f"No file {file_id} in session {session_id}.")
    return row


def of_session(db: DBSession, session_id: int) -> list[File]:
    """Every file of a session, oldest first."""
    return list(db.scalars(select(File).where(File.session_id == session_id).order_by(File.id)))


def for_task(conn: Connection, task: Any, file_id: int) -> Any:
    """A file the task may read: one of its session's, or the adapter it was given."""
    row = conn.execute(select(*_FILES.c).where(_FILES.c.id == file_id)).one_or_none()
    adapter = (task.input or {}).get("adapter") or {}
    if row is None or (row.session_id != task.session_id and adapter.get("id") != row.id):
        raise FileNotFound(f"Task {task.id} has no file {file_id}.")
    return row


def _completed_adapters(*columns: Any) -> Any:
    """A select of `columns` over adapter files whose fine-tune completed."""
    return (select(*columns).join(Interaction.__table__, Interaction.id == _FILES.c.interaction_id)
            .where(_FILES.c.kind == FileKind.ADAPTER.value, Interaction.state == InteractionState.COMPLETE))


def session_adapter(db: DBSession | Connection, session_id: int) -> Any | None:
    """The adapter of the session's last completed fine-tune, if any."""
    stmt = (_completed_adapters(*_FILES.c).where(_FILES.c.session_id == session_id)
            .order_by(_FILES.c.id.desc()).limit(1))
    return db.execute(stmt).one_or_none()


def adapter_method(db: DBSession | Connection, session_id: int) -> str | None:
    """How the session's completed fine-tune trained (`sft`, `dpo`, `reward_model`); None without one.

    A reward model's adapter carries a score head, not a chat model: it scores (scoring.py), never chats.
    """
    adapter = session_adapter(db, session_id)
    if adapter is None:
        return None
    params = db.execute(select(Interaction.params).where(Interaction.id == adapter.interaction_id)).scalar()
    return (params or {}).get("method") or "sft"


def sessions_with_adapters() -> Any:
    """A subquery of the ids of sessions with a completed fine-tune's adapter."""
    return _completed_adapters(_FILES.c.session_id)


def named_in_result(conn: Connection, task: Any, result: dict[str, Any]) -> list[str] | None:
    """Check the files a result names and drop the other files the runner uploaded for this reply.

    None when the result names no file (the common case): the completion itself drops every runner
    file of the reply then, without reading them (transitions.complete). Otherwise the store keys of
    the files dropped here (uploaded by a lost attempt, or not named), deleted once the transaction
    commits. A fine-tune's result must name its adapter.
    """
    named = result.get("files")
    adapter_id = result.get("adapter_file_id")
    if task.mode != Mode.FINETUNE and not named and adapter_id is None:
        return None
    uploaded = {row.id: row for row in conn.execute(select(*_FILES.c).where(
        _FILES.c.interaction_id == task.interaction_id, _FILES.c.kind.in_([k.value for k in RUNNER_KINDS])))}
    keep = _named_files(named or [], "result.files", uploaded, FileKind.OUTPUT)
    if task.mode == Mode.FINETUNE:
        if adapter_id is None:
            raise InvalidField("A fine-tune result needs 'adapter_file_id': upload the adapter first.",
                               field="result.adapter_file_id")
        keep |= _named_files([adapter_id], "result.adapter_file_id", uploaded, FileKind.ADAPTER)
    dropped = [row for file_id, row in uploaded.items() if file_id not in keep]
    if dropped:
        conn.execute(delete(_FILES).where(_FILES.c.id.in_([row.id for row in dropped])))
    return [row.path for row in dropped]


def drop_earlier_attempts(conn: Connection, task: Any) -> list[str]:
    """At a failing end, keep what the last attempt uploaded for the reply and drop older attempts' files.

    Returns the store keys to delete once the transaction commits.
    """
    stale = list(conn.execute(select(_FILES.c.id, _FILES.c.path).where(
        _FILES.c.interaction_id == task.interaction_id, _FILES.c.kind.in_([k.value for k in RUNNER_KINDS]),
        _FILES.c.attempt.is_not(None), _FILES.c.attempt != task.attempt)))
    if stale:
        conn.execute(delete(_FILES).where(_FILES.c.id.in_([row.id for row in stale])))
    return [row.path for row in stale]


def discard(store: FileStore | None, keys: list[str]) -> None:
    """Delete dropped files' bytes from `store` after their rows are gone; without a store, say so."""
    if not keys:
        return
    if store is None:
        logger.warning("%d dropped file(s) left in the store: no store to delete them from", len(keys))
        return
    for key in keys:
        store.delete(key)


def _named_files(ids: Any, where: str, uploaded: dict[int, Any], kind: FileKind) -> set[int]:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InvalidField(f"{where} must be file ids.", field=where)
    for file_id in ids:
        row = uploaded.get(file_id)
        if row is None or row.kind != kind.value:
            raise InvalidField(f"File {file_id} is not an {kind.value} uploaded for this task.", field=where)
    return set(ids)
