"""The event log of a session (tokens, progress, log lines, state changes) and its SSE stream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import JSON, Connection, String, bindparam, func, insert, select, update
from sqlalchemy.orm import Session as DBSession

from .db import Database
from .models import Interaction, Session, Task, TaskEvent, utcnow
from .notifier import publish, session_topic

BATCH = 500

_SESSIONS, _EVENTS = Session.__table__, TaskEvent.__table__
_TASKS, _REPLIES = Task.__table__, Interaction.__table__
# Built once: on the hot paths, building a statement costs more than running it.
_BUMP_SEQ = (update(_SESSIONS).where(_SESSIONS.c.id == bindparam("p_session"))
             .values(event_seq=_SESSIONS.c.event_seq + bindparam("p_count")).returning(_SESSIONS.c.event_seq))
_INSERT = insert(_EVENTS)
_SINCE = (select(_EVENTS).where(_EVENTS.c.session_id == bindparam("p_session"),
                                _EVENTS.c.seq > bindparam("p_after"))
          .order_by(_EVENTS.c.seq).limit(bindparam("p_limit")))
_SET_SEQ = update(_TASKS).where(_TASKS.c.id == bindparam("p_id")).values(last_event_seq=bindparam("p_seq"))
_REPLY_APPEND = (update(_REPLIES).where(_REPLIES.c.id == bindparam("p_id"))
                 .values(output=_REPLIES.c.output + bindparam("p_text", type_=String)))
_REPLY_PROGRESS = (update(_REPLIES).where(_REPLIES.c.id == bindparam("p_id"))
                   .values(progress=bindparam("p_progress", type_=JSON)))


def append(db: DBSession | Connection, *, session_id: int, task_id: int, interaction_id: int, attempt: int,
           items: list[tuple[str, dict[str, Any]]]) -> int:
    """Store events in order with the session's next sequence numbers; returns the last one."""
    if not items:
        return 0
    # Bumping the counter locks the session row until commit, so sequence numbers become visible in
    # order and without gaps: a reader that has seen N has seen everything before N.
    last = db.execute(_BUMP_SEQ, {"p_session": session_id, "p_count": len(items)}).scalar_one()
    first = last - len(items) + 1
    now = utcnow()
    db.execute(_INSERT, [
        {"session_id": session_id, "seq": first + i, "task_id": task_id, "interaction_id": interaction_id,
         "attempt": attempt, "kind": kind, "data": data, "created_at": now}
        for i, (kind, data) in enumerate(items)])
    publish(db, session_topic(session_id), 0)
    return last


def state_event(db: DBSession | Connection, task: Any, state: str, **data: Any) -> None:
    """Record that a task's reply changed state (queued, running, complete, error, cancelled)."""
    append(db, session_id=task.session_id, task_id=task.id, interaction_id=task.interaction_id,
           attempt=task.attempt, items=[("state", {"state": state, **data})])


def record(db: DBSession | Connection, task: Any, items: list[dict[str, Any]]) -> tuple[int, int]:
    """Store a runner's events not stored yet (by seq), its tokens and progress on the reply too.

    Returns how many were new and the last seq stored. The caller has checked the runner's lease in
    the same transaction.
    """
    fresh = sorted((e for e in items if e["seq"] > task.last_event_seq), key=lambda e: e["seq"])
    if not fresh:
        return 0, task.last_event_seq
    last_seq = fresh[-1]["seq"]
    db.execute(_SET_SEQ, {"p_id": task.id, "p_seq": last_seq})
    text = "".join(e["text"] for e in fresh if e["kind"] == "token")
    if text:
        db.execute(_REPLY_APPEND, {"p_id": task.interaction_id, "p_text": text})
    progress = [e for e in fresh if e["kind"] == "progress"]
    if progress:
        db.execute(_REPLY_PROGRESS, {"p_id": task.interaction_id, "p_progress": {
            k: v for k, v in progress[-1].items() if k not in ("seq", "kind")}})
    append(db, session_id=task.session_id, task_id=task.id, interaction_id=task.interaction_id,
           attempt=task.attempt, items=[(e["kind"], {k: v for k, v in e.items() if k not in ("seq", "kind")})
                                        for e in fresh])
    return len(fresh), last_seq


def since(db: DBSession | Connection, session_id: int, after_seq: int, limit: int = BATCH) -> list[Any]:
    """Events of a session after `after_seq`, oldest first."""
    return list(db.execute(_SINCE, {"p_session": session_id, "p_after": after_seq, "p_limit": limit}))


def before_first(db: DBSession | Connection, task_id: int) -> int:
    """The event id just before a task's first event, to follow its reply from: all of it replays.

    A page that starts there rather than at the session's last id shows the events' own text, whatever
    the snapshot it was rendered from: its script clears the reply and rebuilds it from the stream.
    """
    first = db.execute(select(func.min(_EVENTS.c.seq)).where(_EVENTS.c.task_id == task_id)).scalar()
    return max((first or 1) - 1, 0)


def to_json(event: Any) -> dict[str, Any]:
    """An event as clients see it."""
    return {"seq": event.seq, "kind": event.kind, "task_id": event.task_id,
            "interaction_id": event.interaction_id, "attempt": event.attempt,
            "created_at": event.created_at.isoformat(), **event.data}


def format_sse(event: Any) -> str:
    """One Server-Sent Event; its id is the session sequence number, for Last-Event-ID."""
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {json.dumps(to_json(event))}\n\n"


def feed(database: Database, session_id: int, after_seq: int, *, live: bool, keepalive: float,
         recheck: float) -> Iterator[Any | None]:
    """A session's events after `after_seq`, then (if `live`) each as it is stored; None after every
    `keepalive` seconds without one, so a caller can keep its connection from looking idle."""
    quiet_since = time.monotonic()
    with database.notifier.watch(session_topic(session_id)) as watch:
        while True:
            with database.reading() as conn:
                batch = since(conn, session_id, after_seq)
            for event in batch:
                after_seq = event.seq
                yield event
            if batch:
                quiet_since = time.monotonic()
            if len(batch) == BATCH:
                continue
            if not live:
                return
            # Re-check on a timer too: events stored by another process on SQLite send no wake-up.
            watch.wait(recheck)
            if time.monotonic() - quiet_since >= keepalive:
                quiet_since = time.monotonic()
                yield None


def stream(database: Database, session_id: int, after_seq: int, *, follow: bool,
           keepalive: float, recheck: float) -> Iterator[str]:
    """Everything after `after_seq`, then (if `follow`) live events as they are stored, as SSE."""
    yield "retry: 1000\n\n"
    for event in feed(database, session_id, after_seq, live=follow, keepalive=keepalive, recheck=recheck):
        # A comment line when quiet: keeps proxies from closing an idle stream.
        yield ": keepalive\n\n" if event is None else format_sse(event)
