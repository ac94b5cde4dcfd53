"""Leases: a runner's right to work on a task, its terms, and the fencing every worker call goes through.

A lease is the task's current token with an expiry. Every call a runner makes checks, in the same
transaction as its write, that its token is still the task's, the task still active and the lease not
expired; otherwise it gets the 404/409 that explains why and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, select

from helix_api.db import Prepared
from helix_api.errors import LeaseLost, TaskCancelled, TaskNotFound
from helix_api.models import ACTIVE_TASK_STATUSES, Task, TaskStatus
from helix_api.tasks.rows import TaskRow
from helix_api.tasks.rules import Rules

_TASKS = Task.__table__
# Built once: on the hot paths, building a statement costs more than running it.
_SELECT = select(*_TASKS.c).where(_TASKS.c.id == bindparam("p_id"))
_TASK = {False: Prepared(_SELECT), True: Prepared(_SELECT.with_for_update())}


@dataclass(frozen=True)
class Lease:
    """A runner's right to work on a task until `expires_at`."""

    token: str
    expires_at: datetime
    ttl_seconds: float
    heartbeat_seconds: float

    def to_json(self) -> dict[str, Any]:
        """The lease as the worker API returns it."""
        return {"token": self.token, "expires_at": self.expires_at.isoformat(),
                "ttl_seconds": self.ttl_seconds, "heartbeat_seconds": self.heartbeat_seconds}


@dataclass(frozen=True)
class LeasePolicy:
    """How long leases last, how often runners renew them, how many attempts a task gets, and the
    scheduling rules a task is queued and claimed under."""

    ttl_seconds: float = 30.0
    heartbeat_seconds: float = 10.0
    max_attempts: int = 3
    rules: Rules = field(default_factory=Rules)

    def lease(self, token: str, now: datetime) -> Lease:
        """A new lease under `token`, from `now` for this policy's TTL."""
        return Lease(token, now + timedelta(seconds=self.ttl_seconds), self.ttl_seconds, self.heartbeat_seconds)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> LeasePolicy:
        """The policy the LEASE_SECONDS, HEARTBEAT_SECONDS, MAX_ATTEMPTS and scheduling settings describe."""
        return cls(ttl_seconds=settings["LEASE_SECONDS"], heartbeat_seconds=settings["HEARTBEAT_SECONDS"],
                   max_attempts=settings["MAX_ATTEMPTS"], rules=Rules.from_settings(settings))


def load(conn: Connection, task_id: int, *, for_update: bool) -> TaskRow:
    """The task's row, or 404; `for_update` where the database locks rows (SQLite locks it all)."""
    row = _TASK[for_update].one_or_none(conn, {"p_id": task_id})
    if row is None:
        raise TaskNotFound(f"No task {task_id}.")
    return TaskRow.of(row)


def check(task: Any, token: str, now: datetime) -> Any:
    """`task` if `token` is its live lease; otherwise the 409 that explains why not."""
    if task.lease_token != token:
        raise LeaseLost(f"Task {task.id} is no longer leased with this token (it is at attempt "
                        f"{task.attempt}, status {task.status.value}).")
    if task.status == TaskStatus.CANCELLED:
        raise TaskCancelled(f"Task {task.id} was cancelled by its user.")
    if task.status not in ACTIVE_TASK_STATUSES:
        raise LeaseLost(f"Task {task.id} is {task.status.value}; this lease no longer holds it.")
    if task.lease_expires_at is None or task.lease_expires_at < now:
        raise LeaseLost(f"The lease on task {task.id} expired at {task.lease_expires_at}.")
    return task


def held(conn: Connection, task_id: int, token: str, now: datetime, *, for_update: bool) -> TaskRow:
    """The task, if `token` is its live lease; otherwise the 404/409 that explains why not."""
    return check(load(conn, task_id, for_update=for_update), token, now)
