"""The queues runners pull from: one per (mode, type, model), in priority order, then first come first served.

A task joins its queue here, in its creator's transaction; the scheduler takes it off (see scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, exists, func, insert, or_, select
from sqlalchemy.orm import Session as DBSession

from helix_api.models import InteractionState, Mode, SessionType, Task, TaskStatus, utcnow
from helix_api.streaming import events
from helix_api.tasks.notifier import publish, queue_topic

# Lower goes first: a user already in a chat is waiting on every reply.
PRIORITY_CONTINUE = 0
PRIORITY_NEW = 1


@dataclass(frozen=True)
class QueueFilter:
    """The work a runner asks for: one mode, type and model."""

    mode: Mode
    type: SessionType
    model_name: str

    @property
    def topic(self) -> str:
        """The wake-up topic of this queue."""
        return queue_topic(self.mode.value, self.type.value, self.model_name)

    def params(self) -> dict[str, Any]:
        """The bound parameters of `QUEUED`."""
        return {"p_mode": self.mode, "p_type": self.type, "p_model": self.model_name}


_TASKS = Task.__table__
# Statements built once: on the hot paths, building a statement costs more than running it.
# The tasks waiting in one queue, its parameters from `QueueFilter.params()`.
QUEUED = and_(_TASKS.c.status == TaskStatus.QUEUED, _TASKS.c.mode == bindparam("p_mode"),
              _TASKS.c.type == bindparam("p_type"), _TASKS.c.model_name == bindparam("p_model"))
HAS_WORK = select(exists().where(QUEUED))
_AHEAD = select(func.count(_TASKS.c.id)).where(
    QUEUED, or_(_TASKS.c.priority < bindparam("p_priority"),
                and_(_TASKS.c.priority == bindparam("p_priority"), _TASKS.c.id < bindparam("p_id"))))


def enqueue(db: DBSession | Connection, *, session_id: int, interaction_id: int, user_id: int, mode: Mode,
            type_: SessionType, model_name: str, input: dict[str, Any], params: dict[str, Any],
            priority: int, max_attempts: int) -> Any:
    """Queue the task that will produce reply `interaction_id`; returns its row."""
    now = utcnow()
    task = db.execute(insert(_TASKS).returning(*_TASKS.c), {
        "session_id": session_id, "interaction_id": interaction_id, "user_id": user_id, "mode": mode,
        "type": type_, "model_name": model_name, "priority": priority, "status": TaskStatus.QUEUED,
        "input": input, "params": params, "attempt": 0, "max_attempts": max_attempts, "last_event_seq": 0,
        "created_at": now, "queued_at": now}).one()
    events.state_event(db, task, InteractionState.QUEUED.value)
    publish(db, queue_topic(mode.value, type_.value, model_name), 1)
    return task


def queue_position(db: DBSession | Connection, task: Any) -> int:
    """1 for the task that the next matching runner gets, 2 for the one after it, and so on."""
    ahead = db.execute(_AHEAD, {"p_mode": task.mode, "p_type": task.type, "p_model": task.model_name,
                                "p_priority": task.priority, "p_id": task.id}).scalar()
    return int(ahead or 0) + 1
