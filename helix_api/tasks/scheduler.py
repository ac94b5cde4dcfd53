"""The scheduler: when a runner gets a task, and how its attempt ends: complete, fail, release, reap, cancel.

Each of these is one short transaction: the lease checks (leases.py) decide whether the change may
happen, and transitions.py writes it, so no task is handed to two runners and no late runner can
overwrite a result. Which task a runner gets is its claim rule's (claims.py). See notes.md for the
state machine.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from helix_api.db import Database
from helix_api.errors import HelixError, NotCancellable, TaskCancelled
from helix_api.models import ACTIVE_TASK_STATUSES, FAILED_TASK_STATUSES, Task, TaskStatus, utcnow
from helix_api.ops import metrics
from helix_api.sessions import files
from helix_api.sessions.storage import FileStore, StoredBlob
from helix_api.streaming.intake import Intake
from helix_api.streaming.live import LiveReplies
from helix_api.tasks import claims, leases, transitions
from helix_api.tasks.claims import ClaimRule, Kind
from helix_api.tasks.leases import Lease, LeasePolicy
from helix_api.tasks.rows import TaskRow
from helix_api.tasks.runners import Registry
from helix_api.vocabulary import AttemptEnd

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 20_000
# Where a task can be right after its lease holder's `fail`; a new claim changes the lease token.
_AFTER_FAIL = frozenset({TaskStatus.QUEUED, *FAILED_TASK_STATUSES})

_TASKS = Task.__table__


class Scheduler:
    """Hands queued tasks to runners under leases and settles them, for one app.

    Built once per app (and by `helix tasks reap`); it holds the app's reap clock, so expired leases
    are swept at most once per `reap_every` seconds however many runners poll. Files an attempt
    uploaded that its task no longer shows are deleted from `store` once the change commits.
    """

    def __init__(self, database: Database, store: FileStore, policy: LeasePolicy, *,
                 reap_every: float = 1.0, recheck: float = 2.0, intake: Intake | None = None) -> None:
        self.database, self.store, self.policy = database, store, policy
        # Runners' events: tokens in memory, flushed to SQL; the replies being written live there.
        self.intake = intake or Intake(database, LiveReplies(), policy)
        self.reap_every, self.recheck = reap_every, recheck
        self._for_update = database.dialect == "postgresql"
        self.runners = Registry(database)  # who asked for work, written to the runners table
        self._last_reap = float("-inf")  # monotonic time of the last sweep: never, so the first call sweeps
        self._reap_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], database: Database, store: FileStore) -> Scheduler:
        """The scheduler the lease, REAP_SECONDS and RECHECK_SECONDS settings describe."""
        policy = LeasePolicy.from_settings(settings)
        return cls(database, store, policy, reap_every=settings["REAP_SECONDS"],
                   recheck=settings["RECHECK_SECONDS"], intake=Intake.from_settings(settings, database, policy))

    def claim(self, rule: ClaimRule, *, runner: str, runner_token_id: int | None,
              look_first: bool = True) -> tuple[TaskRow, Lease] | None:
        """Lease the first queued task `rule` picks to `runner`, or None when there is none."""
        claimed = self.claim_many(rule, 1, runner=runner, runner_token_id=runner_token_id, look_first=look_first)
        return claimed[0] if claimed else None

    def claim_many(self, rule: ClaimRule, count: int, *, runner: str, runner_token_id: int | None,
                   look_first: bool = True) -> list[tuple[TaskRow, Lease]]:
        """Lease up to `count` tasks `rule` picks to `runner`, in its order, each under its own lease.

        `look_first` reads before writing, so that an empty queue costs no write lock: idle runners
        poll all the time. A runner woken because work was queued skips the look.
        """
        if look_first:
            with self.database.connect() as conn:
                if not rule.has_work(conn):
                    return []
        with self.database.transaction() as conn:
            claimed = []
            for _ in range(count):
                one = self._claim_in(conn, rule, secrets.token_urlsafe(24), runner, runner_token_id)
                if one is None:
                    break
                claimed.append(one)
        for task, _ in claimed:
            logger.info("task %s: claimed by %s (attempt %s)", task.id, runner, task.attempt)
            metrics.claimed(task)
        return claimed

    def _claim_in(self, conn: Connection, rule: ClaimRule, token: str, runner: str,
                  runner_token_id: int | None) -> tuple[TaskRow, Lease] | None:
        now = utcnow()
        lease = self.policy.lease(token, now)
        task = transitions.claim(conn, rule, lease, now, runner=runner, runner_token_id=runner_token_id)
        return (task, lease) if task is not None else None

    def claim_waiting(self, rule: ClaimRule, *, wait: float, client_gone: Callable[[], bool] | None = None,
                      runner: str, runner_token_id: int | None, count: int = 1) -> list[tuple[TaskRow, Lease]]:
        """Claim up to `count` tasks, long-polling up to `wait` seconds for one `rule` picks to be queued.

        The runner's sighting is recorded on the way (batched: see runners.Registry).

        `client_gone` says whether the runner hung up meanwhile (it stopped, or died): a task claimed
        for it would wait out a whole lease before going to anyone else, so it claims nothing. Expired
        leases are reaped on the way.

        A waiter sleeps until it is woken or its wait ends: the safety-net re-check every `recheck`
        seconds wakes one waiter per queue (the notifier's ticker), not every waiter, so a thousand
        idle runners cost a few wake-ups a second, not a thousand.
        """
        self.runners.seen(runner, runner_token_id=runner_token_id,
                          asks_for=(rule.mode, rule.type, rule.model_name, rule.pool))
        deadline = time.monotonic() + wait
        woken = False
        notifier = self.database.notifier
        notifier.tick_every(self.recheck)
        with notifier.watch(*rule.topics) as watch:
            while True:
                self.reap_if_due()
                if client_gone is not None and client_gone():
                    if woken:
                        for topic in rule.topics:  # the wake-up was for a runner: pass it on
                            notifier.notify(topic, 1)
                    logger.info("long poll for %s: the runner hung up; claiming nothing", rule.topic)
                    return []
                claimed = self.claim_many(rule, count, runner=runner, runner_token_id=runner_token_id,
                                          look_first=not woken)
                remaining = deadline - time.monotonic()
                if claimed or remaining <= 0:
                    return claimed
                woken = watch.wait(remaining)

    def _held(self, conn: Connection, task_id: int, token: str, now: datetime) -> TaskRow:
        return leases.held(conn, task_id, token, now, for_update=self._for_update)

    def heartbeat(self, task_id: int, token: str, runner: str | None = None) -> datetime | None:
        """Renew the lease; None when the user cancelled the task (the runner should stop)."""
        if runner is not None:
            self.runners.touched(runner)
        now = utcnow()
        with self.database.transaction() as conn:
            try:
                return transitions.start(conn, self._held(conn, task_id, token, now), now, self.policy.ttl_seconds)
            except TaskCancelled:
                return None

    def add_events(self, task_id: int, token: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Take a runner's events once each (by seq): tokens into the live reply, the rest as rows."""
        answer = self.intake.add([(task_id, token, items)])[0]
        if isinstance(answer, HelixError):
            raise answer
        return answer

    def add_events_many(self, posts: list[tuple[int, str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
        """`add_events` for several tasks of one runner in one request; each answers for itself.

        A task whose lease no longer holds gets its error in its own answer and changes nothing; the
        others are taken all the same.
        """
        return [{"task_id": task_id, **(answer.to_dict() if isinstance(answer, HelixError) else answer)}
                for (task_id, _, _), answer in zip(posts, self.intake.add(posts), strict=True)]

    def leased(self, task_id: int, token: str) -> Any:
        """The task, if `token` is its live lease (a runner reading the task's files)."""
        with self.database.transaction() as conn:
            return self._held(conn, task_id, token, utcnow())

    def add_file(self, task_id: int, token: str, *, kind: files.FileKind, name: str, blob: StoredBlob,
                 content_type: str) -> Any:
        """Record a file a runner made for the task's reply, if its lease still holds."""
        with self.database.transaction() as conn:
            task = self._held(conn, task_id, token, utcnow())
            return files.add(conn, session_id=task.session_id, user_id=task.user_id,
                             interaction_id=task.interaction_id, kind=kind, name=name, blob=blob,
                             content_type=content_type, attempt=task.attempt)

    def complete(self, task_id: int, token: str, result: dict[str, Any],
                 last_events: list[dict[str, Any]] | None = None, *,
                 claim_next: str | None = None) -> tuple[TaskRow, Lease] | None:
        """Store the result of a task whose lease `token` still holds.

        `last_events` are the runner's events not posted yet, stored first in the same transaction:
        the end of a reply costs one round trip, not two. With `claim_next` (the runner's name) the
        same transaction also claims the runner's next task of the same queue, returned with its lease.
        """
        now = utcnow()
        with self.database.transaction() as conn:
            task = leases.load(conn, task_id, for_update=self._for_update)
            if task.lease_token == token and task.status == TaskStatus.COMPLETE:
                # A retry of a call whose answer was lost: it already took effect, claim included.
                return self._claimed_next(conn, token, now) if claim_next else None
            leases.check(task, token, now)
            dropped = files.named_in_result(conn, task, result)
            output = self.intake.finish(conn, task, result, last_events or [])
            dropped = (dropped or []) + transitions.complete(conn, task, result, output, now,
                                                             drop_runner_files=dropped is None)
            claimed = self._claim_next(conn, task, token, claim_next) if claim_next else None
        files.discard(self.store, dropped)  # files of lost attempts, or not named in the result
        metrics.ended(task, AttemptEnd.COMPLETE, result)
        logger.info("task %s: complete (attempt %s)", task_id, task.attempt)
        if claimed is not None:
            metrics.claimed(claimed[0])
        return claimed

    def _claim_next(self, conn: Connection, done: TaskRow, token: str, runner: str) -> tuple[TaskRow, Lease] | None:
        """Claim the next task of `done`'s queue, under a lease token only `token`'s holder can derive.

        The runner holds `done`'s adapter now, so that adapter's work is warm for it.
        """
        rule = ClaimRule((Kind(done.mode, done.type, done.model_name),),
                         warm=(done.adapter,) if done.adapter else (), rules=self.policy.rules)
        claimed = self._claim_in(conn, rule, claims.next_token(token), runner, done.runner_token_id)
        if claimed is not None:
            logger.info("task %s: claimed by %s with the completion of task %s (attempt %s)",
                        claimed[0].id, runner, done.id, claimed[0].attempt)
        return claimed

    def _claimed_next(self, conn: Connection, token: str, now: datetime) -> tuple[TaskRow, Lease] | None:
        """The task the completion under `token` claimed, if that lease still holds it.

        The lease is found by its derived token, so a retried `complete` hands back what the first one
        claimed and never claims twice; a lease that ran out (the task went back to the queue, maybe to
        another runner, under another token) answers nothing.
        """
        return claims.held_by(conn, claims.next_token(token), now, self.policy)

    def fail(self, task_id: int, token: str, error: str, retry: bool) -> TaskStatus:
        """Record a failure: requeue if `retry` and attempts are left, else fail for good.

        At a failing end the reply keeps its last attempt's files; older attempts' files are deleted.
        """
        now = utcnow()
        with self.database.transaction() as conn:
            task = leases.load(conn, task_id, for_update=self._for_update)
            if task.lease_token == token and task.status in _AFTER_FAIL:
                return task.status  # a retry of a call whose answer was lost: it already took effect
            leases.check(task, token, now)
            self.intake.live.forget(task_id)
            error = error[-MAX_ERROR_CHARS:]
            dropped: list[str] = []
            if retry and task.attempt < task.max_attempts:
                status = transitions.requeue(conn, task, now, f"attempt {task.attempt} failed: {error}")
            elif retry:
                status = _end_with_error(conn, task, now, TaskStatus.DEAD,
                                       f"gave up after {task.attempt} attempts; last error: {error}", dropped)
            else:
                status = _end_with_error(conn, task, now, TaskStatus.FAILED, error, dropped)
        files.discard(self.store, dropped)
        metrics.ended(task, AttemptEnd.RETRIED if status == TaskStatus.QUEUED else AttemptEnd(status.value))
        logger.info("task %s: runner reported failure (retry=%s) -> %s", task_id, retry, status.value)
        return status

    def release(self, task_id: int, token: str) -> None:
        """Hand a task back to the queue (its runner is shutting down) without spending an attempt."""
        now = utcnow()
        with self.database.transaction() as conn:
            task = leases.load(conn, task_id, for_update=self._for_update)
            if task.lease_token == token and task.status == TaskStatus.QUEUED:
                return  # a retry of a call whose answer was lost: it already took effect
            leases.check(task, token, now)
            self.intake.live.forget(task_id)
            transitions.requeue(conn, task, now, f"runner {task.runner} handed the task back", give_back=True)
        metrics.ended(task, AttemptEnd.RELEASED)
        logger.info("task %s: released by its runner", task_id)

    def reap(self, now: datetime | None = None) -> int:
        """Requeue tasks whose lease expired (their runner died or hung), or mark them dead; how many.

        A task that dies keeps its last attempt's files; older attempts' files are deleted.
        """
        now = now or utcnow()
        with self.database.connect() as conn:
            expired = conn.execute(select(_TASKS.c.id, _TASKS.c.lease_token).where(
                _TASKS.c.status.in_(ACTIVE_TASK_STATUSES), _TASKS.c.lease_expires_at < now).limit(500)).all()
        reaped = 0
        dropped: list[str] = []
        for task_id, token in expired:
            with self.database.transaction() as conn:
                stmt = select(*_TASKS.c).where(_TASKS.c.id == task_id, _TASKS.c.lease_token == token,
                                               _TASKS.c.status.in_(ACTIVE_TASK_STATUSES),
                                               _TASKS.c.lease_expires_at < now)
                if self._for_update:
                    stmt = stmt.with_for_update(skip_locked=True)
                row = conn.execute(stmt).one_or_none()
                if row is None:  # renewed, finished or reaped by someone else meanwhile
                    continue
                task = TaskRow.of(row)
                self.intake.live.forget(task_id)
                reason = (f"lease expired: runner {task.runner} stopped heartbeating during attempt "
                          f"{task.attempt} of {task.max_attempts}")
                if task.attempt >= task.max_attempts:
                    _end_with_error(conn, task, now, TaskStatus.DEAD, f"{reason}; gave up", dropped)
                    outcome = AttemptEnd.DEAD
                else:
                    transitions.requeue(conn, task, now, reason)
                    outcome = AttemptEnd.RETRIED
            metrics.ended(task, outcome, lease_expired=True)
            reaped += 1
            logger.warning("task %s: %s", task_id, reason)
        files.discard(self.store, dropped)
        return reaped

    def reap_if_due(self) -> None:
        """Reap at most once per `reap_every` seconds; cheap to call from any request."""
        if time.monotonic() - self._last_reap < self.reap_every or not self._reap_lock.acquire(blocking=False):
            return
        try:
            self._last_reap = time.monotonic()
            self.reap()
        except Exception:
            logger.exception("reaping expired leases failed")
        finally:
            self._reap_lock.release()


def _end_with_error(conn: Connection, task: TaskRow, now: datetime, status: TaskStatus, error: str,
                    dropped: list[str]) -> TaskStatus:
    # The reply keeps what its last attempt uploaded (partial outputs help explain the error); the
    # store keys of older attempts' files go to `dropped`, deleted once this commits.
    dropped.extend(files.drop_earlier_attempts(conn, task))
    return transitions.end_with_error(conn, task, now, status, error)


def cancel(database: Database, session_id: int) -> None:
    """Cancel the queued or running task of a session; its runner hears of it at its next heartbeat.

    The one way to cancel, for the session API and /v1 alike: it needs no lease or file store, so it
    takes only the database.
    """
    with database.transaction() as conn:
        task = transitions.cancel(conn, session_id, utcnow())
        if task is None:
            raise NotCancellable(f"Session {session_id} has nothing queued or running to cancel.")
    metrics.ended(task, AttemptEnd.CANCELLED)
    logger.info("task %s: cancelled by its user", task.id)
