"""Scheduling rules: which task a runner gets, leases and their fencing, requeue, death and cancel.

Every change of a task's status happens here, in one short transaction guarded by the task's state
and lease token, so no task is handed to two runners and no late runner can overwrite a result.
See notes.md for the state machine.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session as DBSession

from . import events
from .db import Database
from .errors import LeaseLost, NotCancellable, TaskCancelled, TaskNotFound
from .models import (
    ACTIVE_STATUSES,
    Interaction,
    InteractionState,
    Mode,
    SessionType,
    Task,
    TaskStatus,
    utcnow,
)
from .notifier import publish, queue_topic

logger = logging.getLogger(__name__)

# Lower goes first: a user already in a chat is waiting on every reply (seed 004).
PRIORITY_CONTINUE = 0
PRIORITY_NEW = 1
MAX_ERROR_CHARS = 20_000
# Where a task can be right after its lease holder's `fail`; a new claim changes the lease token.
_AFTER_FAIL = (TaskStatus.QUEUED, TaskStatus.FAILED, TaskStatus.DEAD)


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
    """How long leases last, how often runners renew them, how many attempts a task gets."""

    ttl_seconds: float = 30.0
    heartbeat_seconds: float = 10.0
    max_attempts: int = 3


def enqueue(db: DBSession, *, interaction: Interaction, user_id: int, input: dict[str, Any],
            params: dict[str, Any], priority: int, max_attempts: int) -> Task:
    """Queue the task that will produce `interaction`."""
    session = interaction.session
    task = Task(session_id=session.id, interaction=interaction, user_id=user_id, mode=session.mode,
                type=session.type, model_name=session.model_name, priority=priority, input=input,
                params=params, max_attempts=max_attempts)
    db.add(task)
    db.flush()
    events.state_event(db, task, InteractionState.QUEUED.value)
    publish(db, queue_topic(session.mode.value, session.type.value, session.model_name), 1)
    return task


def _queued(filt: QueueFilter):
    return and_(Task.status == TaskStatus.QUEUED, Task.mode == filt.mode, Task.type == filt.type,
                Task.model_name == filt.model_name)


def claim(database: Database, filt: QueueFilter, *, runner: str, runner_token_id: int | None,
          policy: LeasePolicy) -> tuple[Task, Lease] | None:
    """Lease the first queued task matching `filt` to `runner`, or None when there is none."""
    with database.read() as db:
        # A read first: an empty queue costs no write lock (idle runners poll all the time).
        if not db.scalar(select(exists().where(_queued(filt)))):
            return None
    now = utcnow()
    lease = Lease(secrets.token_urlsafe(24), now + timedelta(seconds=policy.ttl_seconds),
                  policy.ttl_seconds, policy.heartbeat_seconds)
    with database.write() as db:
        candidate = select(Task.id).where(_queued(filt)).order_by(Task.priority, Task.id).limit(1)
        if database.dialect == "postgresql":
            # Concurrent claimers skip a row another transaction is taking instead of queueing on it.
            candidate = candidate.with_for_update(skip_locked=True)
        task = db.scalars(
            update(Task).where(Task.id == candidate.scalar_subquery(), Task.status == TaskStatus.QUEUED)
            .values(status=TaskStatus.CLAIMED, attempt=Task.attempt + 1, lease_token=lease.token,
                    lease_expires_at=lease.expires_at, claimed_at=now, started_at=None, runner=runner,
                    runner_token_id=runner_token_id, last_event_seq=0)
            .returning(Task).execution_options(synchronize_session=False)).one_or_none()
        if task is None:
            return None
        _update_reply(db, task, state=InteractionState.RUNNING)
        events.state_event(db, task, InteractionState.RUNNING.value, phase="claimed", runner=runner)
    logger.info("task %s: claimed by %s (attempt %s)", task.id, runner, task.attempt)
    return task, lease


def claim_waiting(database: Database, filt: QueueFilter, *, wait: float, recheck: float,
                  reap_every: float, **claim_args: Any) -> tuple[Task, Lease] | None:
    """Claim, long-polling up to `wait` seconds for a matching task to be queued."""
    deadline = time.monotonic() + wait
    with database.notifier.watch(filt.topic) as watch:
        while True:
            reap_if_due(database, reap_every)
            claimed = claim(database, filt, **claim_args)
            remaining = deadline - time.monotonic()
            if claimed is not None or remaining <= 0:
                return claimed
            watch.wait(min(recheck, remaining))


def _locked(db: DBSession, database: Database, task_id: int) -> Task:
    stmt = select(Task).where(Task.id == task_id)
    if database.dialect == "postgresql":
        stmt = stmt.with_for_update()
    task = db.scalar(stmt)
    if task is None:
        raise TaskNotFound(f"No task {task_id}.")
    return task


def _check_lease(task: Task, token: str, now: datetime) -> Task:
    """`task` if `token` is its live lease; otherwise the 409 that explains why not."""
    if task.lease_token != token:
        raise LeaseLost(f"Task {task.id} is no longer leased with this token (it is at attempt "
                        f"{task.attempt}, status {task.status.value}).")
    if task.status == TaskStatus.CANCELLED:
        raise TaskCancelled(f"Task {task.id} was cancelled by its user.")
    if task.status not in ACTIVE_STATUSES:
        raise LeaseLost(f"Task {task.id} is {task.status.value}; this lease no longer holds it.")
    if task.lease_expires_at is None or task.lease_expires_at < now:
        raise LeaseLost(f"The lease on task {task.id} expired at {task.lease_expires_at}.")
    return task


def _held_task(db: DBSession, database: Database, task_id: int, token: str, now: datetime) -> Task:
    """The task, locked, if `token` is its live lease; otherwise the 404/409 that explains why not."""
    return _check_lease(_locked(db, database, task_id), token, now)


def _renew(task: Task, now: datetime, policy: LeasePolicy) -> datetime:
    task.status = TaskStatus.RUNNING
    task.started_at = task.started_at or now
    task.lease_expires_at = now + timedelta(seconds=policy.ttl_seconds)
    return task.lease_expires_at


def heartbeat(database: Database, task_id: int, token: str, policy: LeasePolicy) -> datetime | None:
    """Renew the lease; None when the user cancelled the task (the runner should stop)."""
    now = utcnow()
    with database.write() as db:
        try:
            return _renew(_held_task(db, database, task_id, token, now), now, policy)
        except TaskCancelled:
            return None


def add_events(database: Database, task_id: int, token: str, items: list[dict[str, Any]],
               policy: LeasePolicy) -> dict[str, Any]:
    """Store a runner's events once each (by seq), append tokens to the reply, renew the lease."""
    now = utcnow()
    with database.write() as db:
        task = _held_task(db, database, task_id, token, now)
        fresh = sorted((e for e in items if e["seq"] > task.last_event_seq), key=lambda e: e["seq"])
        _renew(task, now, policy)
        if fresh:
            task.last_event_seq = fresh[-1]["seq"]
            text = "".join(e["text"] for e in fresh if e["kind"] == "token")
            progress = [e for e in fresh if e["kind"] == "progress"]
            values: dict[str, Any] = {}
            if text:
                values["output"] = Interaction.output + text
            if progress:
                values["progress"] = {k: v for k, v in progress[-1].items() if k not in ("seq", "kind")}
            if values:
                _update_reply(db, task, **values)
            events.append(db, session_id=task.session_id, task_id=task.id,
                          interaction_id=task.interaction_id, attempt=task.attempt,
                          items=[(e["kind"], {k: v for k, v in e.items() if k not in ("seq", "kind")})
                                 for e in fresh])
        return {"stored": len(fresh), "last_seq": task.last_event_seq, "cancelled": False}


def complete(database: Database, task_id: int, token: str, result: dict[str, Any]) -> None:
    """Store the result of a task whose lease `token` still holds."""
    now = utcnow()
    with database.write() as db:
        task = _locked(db, database, task_id)
        if task.lease_token == token and task.status == TaskStatus.COMPLETE:
            return  # a retry of a call whose answer was lost: it already took effect
        _check_lease(task, token, now)
        task.status, task.result, task.finished_at = TaskStatus.COMPLETE, result, now
        task.lease_expires_at = None
        reply: dict[str, Any] = {"state": InteractionState.COMPLETE, "result": result, "finished_at": now}
        if isinstance(result.get("text"), str):
            reply["output"] = result["text"]
        _update_reply(db, task, **reply)
        events.state_event(db, task, InteractionState.COMPLETE.value)
    logger.info("task %s: complete (attempt %s)", task_id, task.attempt)


def fail(database: Database, task_id: int, token: str, error: str, retry: bool) -> TaskStatus:
    """Record a failure: requeue if `retry` and attempts are left, else fail for good."""
    now = utcnow()
    with database.write() as db:
        task = _locked(db, database, task_id)
        if task.lease_token == token and task.status in _AFTER_FAIL:
            return task.status  # a retry of a call whose answer was lost: it already took effect
        _check_lease(task, token, now)
        error = error[-MAX_ERROR_CHARS:]
        if retry and task.attempt < task.max_attempts:
            _requeue(db, task, now, f"attempt {task.attempt} failed: {error}")
        elif retry:
            _finish_error(db, task, now, TaskStatus.DEAD,
                          f"gave up after {task.attempt} attempts; last error: {error}")
        else:
            _finish_error(db, task, now, TaskStatus.FAILED, error)
        status = task.status
    logger.info("task %s: runner reported failure (retry=%s) -> %s", task_id, retry, status.value)
    return status


def release(database: Database, task_id: int, token: str) -> None:
    """Hand a task back to the queue (its runner is shutting down) without spending an attempt."""
    now = utcnow()
    with database.write() as db:
        task = _locked(db, database, task_id)
        if task.lease_token == token and task.status == TaskStatus.QUEUED:
            return  # a retry of a call whose answer was lost: it already took effect
        _check_lease(task, token, now)
        task.attempt -= 1
        _requeue(db, task, now, f"runner {task.runner} handed the task back")
    logger.info("task %s: released by its runner", task_id)


def _update_reply(db: DBSession, task: Task, **values: Any) -> None:
    """Change the reply interaction of `task` without loading it."""
    db.execute(update(Interaction).where(Interaction.id == task.interaction_id).values(**values))


def _requeue(db: DBSession, task: Task, now: datetime, reason: str) -> None:
    # Keeps its id and priority, so it goes back to its old place in line, not to the end.
    task.status, task.error, task.queued_at, task.lease_expires_at = TaskStatus.QUEUED, reason, now, None
    # The next attempt streams the reply from the start; clients drop the partial text on this event.
    _update_reply(db, task, state=InteractionState.QUEUED, output="", progress=None)
    events.state_event(db, task, InteractionState.QUEUED.value, reason=reason, attempts_used=task.attempt)
    publish(db, queue_topic(task.mode.value, task.type.value, task.model_name), 1)


def _finish_error(db: DBSession, task: Task, now: datetime, status: TaskStatus, error: str) -> None:
    task.status, task.error, task.finished_at, task.lease_expires_at = status, error, now, None
    _update_reply(db, task, state=InteractionState.ERROR, error=error, finished_at=now)
    events.state_event(db, task, InteractionState.ERROR.value, error=error, task_status=status.value)


def reap(database: Database, now: datetime | None = None) -> int:
    """Requeue tasks whose lease expired (their runner died or hung), or mark them dead."""
    now = now or utcnow()
    with database.read() as db:
        expired = db.execute(select(Task.id, Task.lease_token).where(
            Task.status.in_(ACTIVE_STATUSES), Task.lease_expires_at < now).limit(500)).all()
    reaped = 0
    for task_id, token in expired:
        with database.write() as db:
            stmt = select(Task).where(Task.id == task_id, Task.lease_token == token,
                                      Task.status.in_(ACTIVE_STATUSES), Task.lease_expires_at < now)
            if database.dialect == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            task = db.scalar(stmt)
            if task is None:  # renewed, finished or reaped by someone else meanwhile
                continue
            reason = (f"lease expired: runner {task.runner} stopped heartbeating during attempt "
                      f"{task.attempt} of {task.max_attempts}")
            if task.attempt >= task.max_attempts:
                _finish_error(db, task, now, TaskStatus.DEAD, f"{reason}; gave up")
            else:
                _requeue(db, task, now, reason)
            reaped += 1
            logger.warning("task %s: %s", task_id, reason)
    return reaped


_reap_lock = threading.Lock()


def reap_if_due(database: Database, every: float) -> None:
    """Reap at most once per `every` seconds per process; cheap to call from any request."""
    last = getattr(database, "last_reap", 0.0)
    if time.monotonic() - last < every or not _reap_lock.acquire(blocking=False):
        return
    try:
        database.last_reap = time.monotonic()
        reap(database)
    except Exception:
        logger.exception("reaping expired leases failed")
    finally:
        _reap_lock.release()


def cancel(database: Database, session_id: int) -> Task:
    """Cancel the queued or running task of a session; its runner hears of it at its next heartbeat."""
    now = utcnow()
    with database.write() as db:
        stmt = (select(Task).where(Task.session_id == session_id,
                                   Task.status.in_((TaskStatus.QUEUED, *ACTIVE_STATUSES)))
                .order_by(Task.id.desc()).limit(1))
        if database.dialect == "postgresql":
            stmt = stmt.with_for_update()
        task = db.scalar(stmt)
        if task is None:
            raise NotCancellable(f"Session {session_id} has nothing queued or running to cancel.")
        task.status, task.cancelled_at, task.finished_at = TaskStatus.CANCELLED, now, now
        _update_reply(db, task, state=InteractionState.CANCELLED, finished_at=now)
        events.state_event(db, task, InteractionState.CANCELLED.value)
    logger.info("task %s: cancelled by its user", task.id)
    return task


def queue_position(db: DBSession, task: Task) -> int:
    """1 for the task that the next matching runner gets, 2 for the one after it, and so on."""
    ahead = db.scalar(select(func.count(Task.id)).where(
        Task.status == TaskStatus.QUEUED, Task.mode == task.mode, Task.type == task.type,
        Task.model_name == task.model_name,
        or_(Task.priority < task.priority, and_(Task.priority == task.priority, Task.id < task.id))))
    return int(ahead or 0) + 1


def task_payload(task: Task) -> dict[str, Any]:
    """A task as the worker API hands it to a runner."""
    return {"id": task.id, "session_id": task.session_id, "interaction_id": task.interaction_id,
            "mode": task.mode.value, "type": task.type.value, "model_name": task.model_name,
            "attempt": task.attempt, "input": task.input, "params": task.params,
            "adapter": task.input.get("adapter"), "files": task.input.get("files", [])}
