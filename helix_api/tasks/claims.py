"""The claim rule: which queued tasks a runner may take, in what order, and what wakes it up.

A `ClaimRule` is the one description of a runner's request for work. Its filter, its ordering and its
wake-up topic are the seams the scheduling rules plug into: today a rule is one (mode, type, model)
queue served by priority, then first come first served. The claim statement itself, built from the
rule, is in transitions.py; the lease token a `complete` derives for the next task is here.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, exists, select

from helix_api.db import Prepared
from helix_api.models import ACTIVE_TASK_STATUSES, Task, TaskStatus
from helix_api.tasks.leases import Lease, LeasePolicy
from helix_api.tasks.notifier import queue_topic
from helix_api.tasks.rows import TaskRow
from helix_api.vocabulary import Mode, SessionType

_TASKS = Task.__table__

# Lower goes first: a user already in a chat is waiting on every reply.
PRIORITY_CONTINUE = 0
PRIORITY_NEW = 1

# The tasks waiting in one queue: the only place the (mode, type, model) triple is spelled in SQL.
QUEUED = and_(_TASKS.c.status == TaskStatus.QUEUED, _TASKS.c.mode == bindparam("p_mode"),
               _TASKS.c.type == bindparam("p_type"), _TASKS.c.model_name == bindparam("p_model"))
_HAS_WORK = Prepared(select(exists().where(QUEUED)))


@dataclass(frozen=True)
class ClaimRule:
    """What a runner may take: its filter, its ordering and its wake-up topic."""

    mode: Mode
    type: SessionType
    model_name: str

    @classmethod
    def of_task(cls, task: Any) -> ClaimRule:
        """The rule of the runners that may take `task` (whose queue it joins)."""
        return cls(task.mode, task.type, task.model_name)

    @property
    def topic(self) -> str:
        """The wake-up topic of this rule's runners: a task they may take was queued."""
        return queue_topic(self.mode.value, self.type.value, self.model_name)

    @property
    def shape(self) -> tuple[str, ...]:
        """What the rule's SQL depends on besides its parameters: statements are built once per shape."""
        return ("queue",)

    def where(self) -> Any:
        """The filter: the queued tasks this rule may take, its values bound by `params()`."""
        return QUEUED

    def order_by(self) -> tuple[Any, ...]:
        """The ordering: which of those goes first."""
        return (_TASKS.c.priority, _TASKS.c.id)

    def params(self) -> dict[str, Any]:
        """The bound parameters of `where()`."""
        return {"p_mode": self.mode, "p_type": self.type, "p_model": self.model_name}

    def has_work(self, conn: Any) -> bool:
        """Whether anything matches: idle polls read this and take no write lock."""
        row = _HAS_WORK.one_or_none(conn, self.params())
        return bool(row and row[0])


def next_token(token: str) -> str:
    """The lease token of the task claimed with the completion under `token`: derived, so a retry finds it."""
    digest = hashlib.sha256(b"helix-next:" + token.encode()).digest()[:24]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


# The task a `complete` claimed next, found again by the lease token derived from the completed one.
_HELD_BY = select(*_TASKS.c).where(_TASKS.c.status.in_(ACTIVE_TASK_STATUSES),
                                   _TASKS.c.lease_token == bindparam("p_token"))


def held_by(conn: Any, token: str, now: datetime, policy: LeasePolicy) -> tuple[TaskRow, Lease] | None:
    """The task leased under `token` and its lease, if that lease still holds."""
    row = conn.execute(_HELD_BY, {"p_token": token}).one_or_none()
    if row is None or row.lease_expires_at is None or row.lease_expires_at < now:
        return None
    return TaskRow.of(row), Lease(row.lease_token, row.lease_expires_at, policy.ttl_seconds, policy.heartbeat_seconds)
