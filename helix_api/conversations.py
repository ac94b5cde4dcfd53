"""Sessions and their interactions: starting one, continuing it, and showing it to its owner."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession
from sqlalchemy.orm import selectinload

from . import scheduler
from .db import Database
from .errors import SessionBusy, SessionNotFound
from .models import (
    Creator,
    File,
    Interaction,
    InteractionState,
    Mode,
    Session,
    SessionType,
    Task,
    TaskStatus,
    utcnow,
)

_OPEN_TASK = (TaskStatus.QUEUED, TaskStatus.CLAIMED, TaskStatus.RUNNING)


def owned(db: DBSession, user_id: int, session_id: int, *, load: bool = False) -> Session:
    """The user's session; someone else's is as good as missing (404, not 403: ids leak nothing)."""
    stmt = select(Session).where(Session.id == session_id, Session.user_id == user_id)
    if load:
        stmt = stmt.options(selectinload(Session.interactions).selectinload(Interaction.task))
    session = db.scalar(stmt)
    if session is None:
        raise SessionNotFound(f"No session {session_id}.")
    return session


def conversation(session: Session) -> list[dict[str, str]]:
    """The chat so far as role/content messages: each user message with its completed reply.

    A message whose reply failed or was cancelled is left out with it, so roles keep alternating
    as chat templates require.
    """
    messages: list[dict[str, str]] = []
    pending_user: Interaction | None = None
    for item in session.interactions:
        if item.creator == Creator.USER:
            pending_user = item
        elif pending_user is not None and item.state == InteractionState.COMPLETE:
            messages.append({"role": "user", "content": pending_user.message})
            messages.append({"role": "assistant", "content": item.output})
            pending_user = None
    return messages


def _add_turn(db: DBSession, session: Session, user_id: int, message: str, params: dict[str, Any],
              priority: int, policy: scheduler.LeasePolicy, history: list[dict[str, str]]) -> Task:
    now = utcnow()
    # task=None: known to have none, so showing it later costs no query.
    db.add(Interaction(session=session, creator=Creator.USER, message=message, params=params,
                       state=InteractionState.COMPLETE, created_at=now, finished_at=now, task=None))
    reply = Interaction(session=session, creator=Creator.ASSISTANT, params=params,
                        state=InteractionState.QUEUED, created_at=now, task=None)
    db.add(reply)
    session.updated_at = now
    db.flush()  # ids for the task
    task_input: dict[str, Any] = {"messages": [*history, {"role": "user", "content": message}]}
    if session.type == SessionType.IMAGE:
        task_input["prompt"] = message
    return scheduler.enqueue(db, interaction=reply, user_id=user_id, input=task_input, params=params,
                             priority=priority, max_attempts=policy.max_attempts)


def create(database: Database, *, user_id: int, mode: Mode, type_: SessionType, model_name: str,
           message: str, params: dict[str, Any], name: str | None,
           policy: scheduler.LeasePolicy) -> dict[str, Any]:
    """Start a session with its first message and queue the task that answers it; returns its JSON."""
    with database.write() as db:
        session = Session(user_id=user_id, mode=mode, type=type_, model_name=model_name,
                          name=(name or message.strip().splitlines()[0])[:200], interactions=[],
                          created_at=utcnow())
        db.add(session)
        _add_turn(db, session, user_id, message, params, scheduler.PRIORITY_NEW, policy, history=[])
        # Shown from what is in hand: a new session has no files and nothing more to read back.
        return session_json(db, session, files=[])


def add_message(database: Database, *, user_id: int, session_id: int, message: str,
                params: dict[str, Any], policy: scheduler.LeasePolicy) -> None:
    """Continue a session; its task goes ahead of tasks that start new sessions."""
    with database.write() as db:
        session = owned(db, user_id, session_id, load=True)
        if any(i.task is not None and i.task.status in _OPEN_TASK for i in session.interactions):
            raise SessionBusy(f"Session {session_id} is still answering its previous message: "
                              "wait for it (GET the session or follow its events) or cancel it.")
        _add_turn(db, session, user_id, message, params, scheduler.PRIORITY_CONTINUE, policy,
                  history=conversation(session))


def _interaction_json(db: DBSession, item: Interaction, files: list[File]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": item.id, "creator": item.creator.value, "state": item.state.value,
        "message": item.message, "params": item.params, "output": item.output, "progress": item.progress,
        "files": [{"id": f.id, "name": f.name, "kind": f.kind, "size": f.size,
                   "content_type": f.content_type} for f in files],
        "error": item.error, "created_at": item.created_at.isoformat(),
        "finished_at": item.finished_at.isoformat() if item.finished_at else None,
    }
    task = item.task
    if task is not None:
        body["result"] = item.result
        body["task"] = {"id": task.id, "status": task.status.value, "attempt": task.attempt,
                        "max_attempts": task.max_attempts}
        if task.status == TaskStatus.QUEUED:
            body["queue_position"] = scheduler.queue_position(db, task)
    return body


def session_json(db: DBSession, session: Session, *, detail: bool = True,
                 files: list[File] | None = None) -> dict[str, Any]:
    """A session as its owner sees it; with `detail`, every interaction too (and `files`, if known)."""
    last = session.interactions[-1] if session.interactions else None
    body: dict[str, Any] = {
        "id": session.id, "name": session.name, "mode": session.mode.value, "type": session.type.value,
        "model_name": session.model_name, "state": last.state.value if last else None,
        "created_at": session.created_at.isoformat(), "updated_at": session.updated_at.isoformat(),
        "last_event_seq": session.event_seq,
    }
    if detail:
        if files is None:
            files = list(db.scalars(select(File).where(File.session_id == session.id).order_by(File.id)))
        by_interaction: dict[int | None, list[File]] = {}
        for f in files:
            by_interaction.setdefault(f.interaction_id, []).append(f)
        body["interactions"] = [_interaction_json(db, i, by_interaction.get(i.id, []))
                                for i in session.interactions]
    return body


def page(db: DBSession, user_id: int, *, limit: int, before: int | None) -> dict[str, Any]:
    """The user's sessions, newest first; pass `next_before` back as `before` for the next page."""
    stmt = select(Session).where(Session.user_id == user_id)
    if before is not None:
        stmt = stmt.where(Session.id < before)
    rows = list(db.scalars(stmt.options(selectinload(Session.interactions))
                           .order_by(Session.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return {"sessions": [session_json(db, s, detail=False) for s in rows],
            "next_before": rows[-1].id if more else None}
