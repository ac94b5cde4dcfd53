"""Event storage: a session's rows (state changes, progress, log lines) and the stored text of its replies.

Tokens are not rows: they live in memory while a reply is written (live.py) and reach the reply's
`output` in flushes (`store_text`). Following a session, rows and text together, is feed.py's.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Connection, String, bindparam, func, insert, select, update
from sqlalchemy.orm import Session as DBSession

from helix_api.db import Prepared
from helix_api.models import Interaction, Session, Task, TaskEvent, utcnow
from helix_api.tasks.notifier import publish, session_topic

BATCH = 500

_SESSIONS, _EVENTS = Session.__table__, TaskEvent.__table__
_TASKS, _REPLIES = Task.__table__, Interaction.__table__
# Built once: on the hot paths, building a statement costs more than running it.
_BUMP_SEQ = (update(_SESSIONS).where(_SESSIONS.c.id == bindparam("p_session"))
             .values(event_seq=_SESSIONS.c.event_seq + bindparam("p_count")).returning(_SESSIONS.c.event_seq))
_INSERT = insert(_EVENTS)
_INSERT_ONE = Prepared(insert(_EVENTS).values({c.name: bindparam(c.name) for c in _EVENTS.c if c.name != "id"}))
_BUMP_ONE = Prepared(_BUMP_SEQ)
_SINCE = (select(_EVENTS).where(_EVENTS.c.session_id == bindparam("p_session"),
                                _EVENTS.c.seq > bindparam("p_after"))
          .order_by(_EVENTS.c.seq).limit(bindparam("p_limit")))
_REPLY_APPEND = (update(_REPLIES).where(_REPLIES.c.id == bindparam("p_id"))
                 .values(output=_REPLIES.c.output + bindparam("p_text", type_=String)))
_STORED = (select(_TASKS.c.attempt, _REPLIES.c.output, _TASKS.c.last_event_seq)
           .join_from(_TASKS, _REPLIES, _REPLIES.c.id == _TASKS.c.interaction_id)
           .where(_TASKS.c.id == bindparam("p_id")))
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
    if not isinstance(db, Connection):
        append(db, session_id=task.session_id, task_id=task.id, interaction_id=task.interaction_id,
               attempt=task.attempt, items=[("state", {"state": state, **data})])
        return
    # The hot paths' way (claims and ends on SQLite): the same two statements, prepared.
    seq = _BUMP_ONE.rows(db, {"p_session": task.session_id, "p_count": 1})[0][0]
    _INSERT_ONE.run(db, {"session_id": task.session_id, "seq": seq, "task_id": task.id,
                         "interaction_id": task.interaction_id, "attempt": task.attempt, "kind": "state",
                         "data": {"state": state, **data}, "created_at": utcnow()})
    publish(db, session_topic(task.session_id), 0)


def rows(db: DBSession | Connection, task: Any, items: list[dict[str, Any]]) -> None:
    """Store a runner's events that are not tokens (progress, log lines) as rows, progress on the reply too."""
    progress = [e for e in items if e["kind"] == "progress"]
    if progress:
        db.execute(_REPLY_PROGRESS, {"p_id": task.interaction_id, "p_progress": {
            k: v for k, v in progress[-1].items() if k not in ("seq", "kind")}})
    append(db, session_id=task.session_id, task_id=task.id, interaction_id=task.interaction_id,
           attempt=task.attempt, items=[(e["kind"], {k: v for k, v in e.items() if k not in ("seq", "kind")})
                                        for e in items])


def append_text(db: Connection, interaction_id: int, text: str) -> None:
    """Append flushed text to a reply's output; its task's seq moved in the same transaction (intake.py)."""
    if text:
        db.execute(_REPLY_APPEND, {"p_id": interaction_id, "p_text": text})


def stored_text(db: DBSession | Connection, task_id: int) -> Any:
    """(attempt, output, last_event_seq) of a task and its reply as SQL holds them, or None."""
    return db.execute(_STORED, {"p_id": task_id}).one_or_none()


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
