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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, String, and_, bindparam, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session as DBSession

from . import events, files
from .db import Database
from .errors import LeaseLost, NotCancellable, TaskCancelled, TaskNotFound
from .models import (
    ACTIVE_TASK_STATUSES,
    FAILED_TASK_STATUSES,
    OPEN_TASK_STATUSES,
    Interaction,
    InteractionState,
    Mode,
    SessionType,
    Task,
    TaskStatus,
    utcnow,
)
from .notifier import publish, queue_topic
from .storage import FileStore, StoredBlob

logger = logging.getLogger(__name__)

# Lower goes first: a user already in a chat is waiting on every reply (seed 004).
PRIORITY_CONTINUE = 0
PRIORITY_NEW = 1
MAX_ERROR_CHARS = 20_000
# Where a task can be right after its lease holder's `fail`; a new claim changes the lease token.
_AFTER_FAIL = frozenset({TaskStatus.QUEUED, *FAILED_TASK_STATUSES})


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


_TASKS, _REPLIES = Task.__table__, Interaction.__table__

# Statements built once: on the hot paths, building a statement costs more than running it.
_QUEUED = and_(_TASKS.c.status == TaskStatus.QUEUED, _TASKS.c.mode == bindparam("p_mode"),
               _TASKS.c.type == bindparam("p_type"), _TASKS.c.model_name == bindparam("p_model"))
_HAS_WORK = select(exists().where(_QUEUED))


def _claim_statement(skip_locked: bool):
    candidate = select(_TASKS.c.id).where(_QUEUED).order_by(_TASKS.c.priority, _TASKS.c.id).limit(1)
    if skip_locked:
        # Concurrent claimers skip a row another transaction is taking instead of queueing on it.
        candidate = candidate.with_for_update(skip_locked=True)
    return (update(_TASKS)
            .where(_TASKS.c.id == candidate.scalar_subquery(), _TASKS.c.status == TaskStatus.QUEUED)
            .values(status=TaskStatus.CLAIMED, attempt=_TASKS.c.attempt + 1, lease_token=bindparam("p_token"),
                    lease_expires_at=bindparam("p_expires"), claimed_at=bindparam("p_now"), started_at=None,
                    runner=bindparam("p_runner"), runner_token_id=bindparam("p_runner_token"), last_event_seq=0)
            .returning(*_TASKS.c))


_CLAIM = {False: _claim_statement(False), True: _claim_statement(True)}
_TASK = {lock: (select(*_TASKS.c).where(_TASKS.c.id == bindparam("p_id")).with_for_update() if lock
                else select(*_TASKS.c).where(_TASKS.c.id == bindparam("p_id"))) for lock in (False, True)}
_RENEW = (update(_TASKS).where(_TASKS.c.id == bindparam("p_id"))
          .values(status=TaskStatus.RUNNING, lease_expires_at=bindparam("p_expires"),
                  started_at=func.coalesce(_TASKS.c.started_at, bindparam("p_now"))))
_COMPLETE = (update(_TASKS).where(_TASKS.c.id == bindparam("p_id"))
             .values(status=TaskStatus.COMPLETE, result=bindparam("p_result"), finished_at=bindparam("p_now"),
                     lease_expires_at=None))
_REPLY_RUNNING = (update(_REPLIES).where(_REPLIES.c.id == bindparam("p_id"))
                  .values(state=InteractionState.RUNNING))
# A result without `text` (an image, say) keeps the output streamed so far.
_REPLY_DONE = (update(_REPLIES).where(_REPLIES.c.id == bindparam("p_id"))
               .values(state=InteractionState.COMPLETE, result=bindparam("p_result"),
                       finished_at=bindparam("p_now"),
                       output=func.coalesce(bindparam("p_output", type_=String), _REPLIES.c.output)))


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


def _filter_params(filt: QueueFilter) -> dict[str, Any]:
    return {"p_mode": filt.mode, "p_type": filt.type, "p_model": filt.model_name}


def claim(database: Database, filt: QueueFilter, *, runner: str, runner_token_id: int | None,
          policy: LeasePolicy, look_first: bool = True) -> tuple[Any, Lease] | None:
    """Lease the first queued task matching `filt` to `runner`, or None when there is none.

    `look_first` reads before writing, so that an empty queue costs no write lock: idle runners
    poll all the time. A runner woken because work was queued skips the look.
    """
    if look_first:
        with database.reading() as conn:
            if not conn.execute(_HAS_WORK, _filter_params(filt)).scalar():
                return None
    now = utcnow()
    lease = Lease(secrets.token_urlsafe(24), now + timedelta(seconds=policy.ttl_seconds),
                  policy.ttl_seconds, policy.heartbeat_seconds)
    with database.transaction() as conn:
        task = conn.execute(_CLAIM[database.dialect == "postgresql"], {
            **_filter_params(filt), "p_token": lease.token, "p_expires": lease.expires_at, "p_now": now,
            "p_runner": runner, "p_runner_token": runner_token_id}).one_or_none()
        if task is None:
            return None
        conn.execute(_REPLY_RUNNING, {"p_id": task.interaction_id})
        events.state_event(conn, task, InteractionState.RUNNING.value, phase="claimed", runner=runner)
    logger.info("task %s: claimed by %s (attempt %s)", task.id, runner, task.attempt)
    return task, lease


def claim_waiting(database: Database, filt: QueueFilter, *, wait: float, recheck: float,
                  reap_every: float, client_gone: Callable[[], bool] | None = None,
                  store: FileStore | None = None, **claim_args: Any) -> tuple[Any, Lease] | None:
    """Claim, long-polling up to `wait` seconds for a matching task to be queued.

    `client_gone` says whether the runner hung up meanwhile (it stopped, or died): a task claimed for
    it would wait out a whole lease before going to anyone else, so it claims nothing. Expired
    leases are reaped on the way, their dropped files deleted from `store`.
    """
    deadline = time.monotonic() + wait
    woken = False
    with database.notifier.watch(filt.topic) as watch:
        while True:
            reap_if_due(database, reap_every, store)
            if client_gone is not None and client_gone():
                if woken:
                    database.notifier.notify(filt.topic, 1)  # the wake-up was for a runner: pass it on
                logger.info("long poll for %s: the runner hung up; claiming nothing", filt.topic)
                return None
            claimed = claim(database, filt, look_first=not woken, **claim_args)
            remaining = deadline - time.monotonic()
            if claimed is not None or remaining <= 0:
                return claimed
            woken = watch.wait(min(recheck, remaining))


def _locked(conn: Connection, database: Database, task_id: int) -> Any:
    task = conn.execute(_TASK[database.dialect == "postgresql"], {"p_id": task_id}).one_or_none()
    if task is None:
        raise TaskNotFound(f"No task {task_id}.")
    return task


def _check_lease(task: Any, token: str, now: datetime) -> Any:
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


def _held_task(conn: Connection, database: Database, task_id: int, token: str, now: datetime) -> Any:
    """The task, locked, if `token` is its live lease; otherwise the 404/409 that explains why not."""
    return _check_lease(_locked(conn, database, task_id), token, now)


def _renew(conn: Connection, task: Any, now: datetime, policy: LeasePolicy) -> datetime:
    expires = now + timedelta(seconds=policy.ttl_seconds)
    conn.execute(_RENEW, {"p_id": task.id, "p_expires": expires, "p_now": now})
    return expires


def heartbeat(database: Database, task_id: int, token: str, policy: LeasePolicy) -> datetime | None:
    """Renew the lease; None when the user cancelled the task (the runner should stop)."""
    now = utcnow()
    with database.transaction() as conn:
        try:
            return _renew(conn, _held_task(conn, database, task_id, token, now), now, policy)
        except TaskCancelled:
            return None


def add_events(database: Database, task_id: int, token: str, items: list[dict[str, Any]],
               policy: LeasePolicy) -> dict[str, Any]:
    """Store a runner's events once each (by seq), append tokens to the reply, renew the lease."""
    now = utcnow()
    with database.transaction() as conn:
        task = _held_task(conn, database, task_id, token, now)
        _renew(conn, task, now, policy)
        stored, last_seq = events.record(conn, task, items)
        return {"stored": stored, "last_seq": last_seq, "cancelled": False}


def add_events_many(database: Database, posts: list[tuple[int, str, list[dict[str, Any]]]],
                    policy: LeasePolicy) -> list[dict[str, Any]]:
    """`add_events` for several tasks of one runner in one transaction; each answers for itself.

    A task whose lease no longer holds gets its error in its own answer and changes nothing; the
    others are stored all the same.
    """
    now = utcnow()
    answers: list[dict[str, Any]] = []
    with database.transaction() as conn:
        for task_id, token, items in posts:
            try:
                task = _held_task(conn, database, task_id, token, now)
            except (LeaseLost, TaskCancelled, TaskNotFound) as exc:  # raised before this task wrote anything
                answers.append({"task_id": task_id, **exc.to_dict()})
                continue
            _renew(conn, task, now, policy)
            stored, last_seq = events.record(conn, task, items)
            answers.append({"task_id": task_id, "stored": stored, "last_seq": last_seq, "cancelled": False})
    return answers


def leased(database: Database, task_id: int, token: str) -> Any:
    """The task, if `token` is its live lease (a runner reading the task's files)."""
    with database.transaction() as conn:
        return _held_task(conn, database, task_id, token, utcnow())


def add_file(database: Database, task_id: int, token: str, *, kind: files.FileKind, name: str,
             blob: StoredBlob, content_type: str) -> Any:
    """Record a file a runner made for the task's reply, if its lease still holds."""
    with database.transaction() as conn:
        task = _held_task(conn, database, task_id, token, utcnow())
        return files.add(conn, session_id=task.session_id, user_id=task.user_id,
                         interaction_id=task.interaction_id, kind=kind, name=name, blob=blob,
                         content_type=content_type, attempt=task.attempt)


def complete(database: Database, task_id: int, token: str, result: dict[str, Any],
             last_events: list[dict[str, Any]] | None = None, store: FileStore | None = None) -> None:
    """Store the result of a task whose lease `token` still holds; files it dropped leave `store`.

    `last_events` are the runner's events not posted yet, stored first in the same transaction: the
    end of a reply costs one round trip, not two.
    """
    now = utcnow()
    with database.transaction() as conn:
        task = _locked(conn, database, task_id)
        if task.lease_token == token and task.status == TaskStatus.COMPLETE:
            return  # a retry of a call whose answer was lost: it already took effect
        _check_lease(task, token, now)
        dropped = files.settle_result(conn, task, result)
        if last_events:
            events.record(conn, task, last_events)
        conn.execute(_COMPLETE, {"p_id": task.id, "p_result": result, "p_now": now})
        text = result.get("text")
        conn.execute(_REPLY_DONE, {"p_id": task.interaction_id, "p_result": result, "p_now": now,
                                   "p_output": text if isinstance(text, str) else None})
        events.state_event(conn, task, InteractionState.COMPLETE.value)
    files.discard(store, dropped)  # files of lost attempts, or not named in the result
    logger.info("task %s: complete (attempt %s)", task_id, task.attempt)


def fail(database: Database, task_id: int, token: str, error: str, retry: bool,
         store: FileStore | None = None) -> TaskStatus:
    """Record a failure: requeue if `retry` and attempts are left, else fail for good.

    At a failing end the reply keeps its last attempt's files; older attempts' files leave `store`.
    """
    now = utcnow()
    with database.transaction() as conn:
        task = _locked(conn, database, task_id)
        if task.lease_token == token and task.status in _AFTER_FAIL:
            return task.status  # a retry of a call whose answer was lost: it already took effect
        _check_lease(task, token, now)
        error = error[-MAX_ERROR_CHARS:]
        dropped: list[str] = []
        if retry and task.attempt < task.max_attempts:
            status = _requeue(conn, task, now, f"attempt {task.attempt} failed: {error}")
        elif retry:
            status = _finish_error(conn, task, now, TaskStatus.DEAD,
                                   f"gave up after {task.attempt} attempts; last error: {error}", dropped)
        else:
            status = _finish_error(conn, task, now, TaskStatus.FAILED, error, dropped)
    files.discard(store, dropped)
    logger.info("task %s: runner reported failure (retry=%s) -> %s", task_id, retry, status.value)
    return status


def release(database: Database, task_id: int, token: str) -> None:
    """Hand a task back to the queue (its runner is shutting down) without spending an attempt."""
    now = utcnow()
    with database.transaction() as conn:
        task = _locked(conn, database, task_id)
        if task.lease_token == token and task.status == TaskStatus.QUEUED:
            return  # a retry of a call whose answer was lost: it already took effect
        _check_lease(task, token, now)
        _requeue(conn, task, now, f"runner {task.runner} handed the task back", give_back=True)
    logger.info("task %s: released by its runner", task_id)


def _update_task(conn: Connection, task: Any, **values: Any) -> None:
    conn.execute(update(_TASKS).where(_TASKS.c.id == task.id).values(**values))


def _update_reply(conn: Connection, task: Any, **values: Any) -> None:
    """Change the reply interaction of `task` without loading it."""
    conn.execute(update(_REPLIES).where(_REPLIES.c.id == task.interaction_id).values(**values))


def _requeue(conn: Connection, task: Any, now: datetime, reason: str, give_back: bool = False) -> TaskStatus:
    # Keeps its id and priority, so it goes back to its old place in line, not to the end.
    attempt = task.attempt - 1 if give_back else task.attempt
    _update_task(conn, task, status=TaskStatus.QUEUED, error=reason, queued_at=now, lease_expires_at=None,
                 attempt=attempt)
    # The next attempt streams the reply from the start; clients drop the partial text on this event.
    _update_reply(conn, task, state=InteractionState.QUEUED, output="", progress=None)
    events.state_event(conn, task, InteractionState.QUEUED.value, reason=reason, attempts_used=attempt)
    publish(conn, queue_topic(task.mode.value, task.type.value, task.model_name), 1)
    return TaskStatus.QUEUED


def _finish_error(conn: Connection, task: Any, now: datetime, status: TaskStatus, error: str,
                  dropped: list[str]) -> TaskStatus:
    # The reply keeps what its last attempt uploaded (partial outputs help explain the error); the
    # store keys of older attempts' files go to `dropped`, deleted once this commits.
    dropped.extend(files.drop_earlier_attempts(conn, task))
    _update_task(conn, task, status=status, error=error, finished_at=now, lease_expires_at=None)
    _update_reply(conn, task, state=InteractionState.ERROR, error=error, finished_at=now)
    events.state_event(conn, task, InteractionState.ERROR.value, error=error, task_status=status.value)
    return status


def reap(database: Database, now: datetime | None = None, store: FileStore | None = None) -> int:
    """Requeue tasks whose lease expired (their runner died or hung), or mark them dead; how many.

    A task that dies keeps its last attempt's files; older attempts' files leave `store`.
    """
    now = now or utcnow()
    with database.reading() as conn:
        expired = conn.execute(select(_TASKS.c.id, _TASKS.c.lease_token).where(
            _TASKS.c.status.in_(ACTIVE_TASK_STATUSES), _TASKS.c.lease_expires_at < now).limit(500)).all()
    reaped = 0
    dropped: list[str] = []
    for task_id, token in expired:
        with database.transaction() as conn:
            stmt = select(*_TASKS.c).where(_TASKS.c.id == task_id, _TASKS.c.lease_token == token,
                                           _TASKS.c.status.in_(ACTIVE_TASK_STATUSES), _TASKS.c.lease_expires_at < now)
            if database.dialect == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            task = conn.execute(stmt).one_or_none()
            if task is None:  # renewed, finished or reaped by someone else meanwhile
                continue
            reason = (f"lease expired: runner {task.runner} stopped heartbeating during attempt "
                      f"{task.attempt} of {task.max_attempts}")
            if task.attempt >= task.max_attempts:
                _finish_error(conn, task, now, TaskStatus.DEAD, f"{reason}; gave up", dropped)
            else:
                _requeue(conn, task, now, reason)
            reaped += 1
            logger.warning("task %s: %s", task_id, reason)
    files.discard(store, dropped)
    return reaped


_reap_lock = threading.Lock()


def reap_if_due(database: Database, every: float, store: FileStore | None = None) -> None:
    """Reap at most once per `every` seconds per process; cheap to call from any request."""
    last = getattr(database, "last_reap", 0.0)
    if time.monotonic() - last < every or not _reap_lock.acquire(blocking=False):
        return
    try:
        database.last_reap = time.monotonic()
        reap(database, store=store)
    except Exception:
        logger.exception("reaping expired leases failed")
    finally:
        _reap_lock.release()


def cancel(database: Database, session_id: int) -> None:
    """Cancel the queued or running task of a session; its runner hears of it at its next heartbeat."""
    now = utcnow()
    with database.transaction() as conn:
        stmt = (select(*_TASKS.c).where(_TASKS.c.session_id == session_id,
                                        _TASKS.c.status.in_(OPEN_TASK_STATUSES))
                .order_by(_TASKS.c.id.desc()).limit(1))
        if database.dialect == "postgresql":
            stmt = stmt.with_for_update()
        task = conn.execute(stmt).one_or_none()
        if task is None:
            raise NotCancellable(f"Session {session_id} has nothing queued or running to cancel.")
        # The lease token stays, so the runner's next heartbeat is told "cancelled", not "lost".
        _update_task(conn, task, status=TaskStatus.CANCELLED, cancelled_at=now, finished_at=now)
        _update_reply(conn, task, state=InteractionState.CANCELLED, finished_at=now)
        events.state_event(conn, task, InteractionState.CANCELLED.value)
    logger.info("task %s: cancelled by its user", task.id)


_AHEAD = select(func.count(_TASKS.c.id)).where(
    _QUEUED, or_(_TASKS.c.priority < bindparam("p_priority"),
                 and_(_TASKS.c.priority == bindparam("p_priority"), _TASKS.c.id < bindparam("p_id"))))


def queue_position(db: DBSession | Connection, task: Any) -> int:
    """1 for the task that the next matching runner gets, 2 for the one after it, and so on."""
    ahead = db.execute(_AHEAD, {"p_mode": task.mode, "p_type": task.type, "p_model": task.model_name,
                                "p_priority": task.priority, "p_id": task.id}).scalar()
    return int(ahead or 0) + 1

