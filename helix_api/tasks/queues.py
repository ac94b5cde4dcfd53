"""The queues runners pull from, as users see them: a task's place in line.

A task joins its queue in transitions.enqueue; which task a runner gets is the claim rule's (claims.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, or_, select
from sqlalchemy.orm import Session as DBSession

from helix_api.models import Task
from helix_api.tasks.claims import PRIORITY_CONTINUE, PRIORITY_NEW, QUEUED, ClaimRule

__all__ = ["PRIORITY_CONTINUE", "PRIORITY_NEW", "queue_position"]

_TASKS = Task.__table__
_AHEAD = select(func.count(_TASKS.c.id)).where(
    QUEUED, or_(_TASKS.c.priority < bindparam("p_priority"),
               and_(_TASKS.c.priority == bindparam("p_priority"), _TASKS.c.id < bindparam("p_id"))))


def queue_position(db: DBSession | Connection, task: Any) -> int:
    """1 for the task that the next matching runner gets, 2 for the one after it, and so on."""
    ahead = db.execute(_AHEAD, {**ClaimRule.of_task(task).queue_params(), "p_priority": task.priority,
                                "p_id": task.id}).scalar()
    return int(ahead or 0) + 1
