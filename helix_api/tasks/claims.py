"""Claims: the statement that hands the first queued task of a queue to a runner, under a new lease.

A claim is one `UPDATE ... WHERE id = (SELECT ... ORDER BY priority, id LIMIT 1 [FOR UPDATE SKIP
LOCKED]) AND status = 'queued' RETURNING ...`, in the caller's transaction, so no task is handed to
two runners. The scheduler decides when to claim (a poll, a long-poll woken by a queued task, a
`complete` that asks for the next task); this module only how.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from helix_api.models import ACTIVE_TASK_STATUSES, Interaction, InteractionState, Task, TaskStatus, utcnow
from helix_api.streaming import events
from helix_api.tasks import queues
from helix_api.tasks.leases import Lease, LeasePolicy
from helix_api.tasks.queues import QueueFilter

_TASKS, _REPLIES = Task.__table__, Interaction.__table__


# Statements built once: on the hot paths, building a statement costs more than running it.
def _claim_statement(skip_locked: bool):
    candidate = select(_TASKS.c.id).where(queues.QUEUED).order_by(_TASKS.c.priority, _TASKS.c.id).limit(1)
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
# The task a `complete` claimed next, found again by the lease token derived from the completed one.
_HELD_BY = select(*_TASKS.c).where(_TASKS.c.status.in_(ACTIVE_TASK_STATUSES),
                                   _TASKS.c.lease_token == bindparam("p_token"))
_REPLY_RUNNING = (update(_REPLIES).where(_REPLIES.c.id == bindparam("p_id"))
                  .values(state=InteractionState.RUNNING))


def take(conn: Connection, filt: QueueFilter, token: str, policy: LeasePolicy, *, runner: str,
         runner_token_id: int | None, skip_locked: bool) -> tuple[Any, Lease] | None:
    """Claim the first queued task of `filt` under lease `token`, in `conn`'s transaction; None if none."""
    now = utcnow()
    lease = Lease(token, now + timedelta(seconds=policy.ttl_seconds), policy.ttl_seconds, policy.heartbeat_seconds)
    task = conn.execute(_CLAIM[skip_locked], {
        **filt.params(), "p_token": lease.token, "p_expires": lease.expires_at, "p_now": now,
        "p_runner": runner, "p_runner_token": runner_token_id}).one_or_none()
    if task is None:
        return None
    conn.execute(_REPLY_RUNNING, {"p_id": task.interaction_id})
    events.state_event(conn, task, InteractionState.RUNNING.value, phase="claimed", runner=runner)
    return task, lease


def next_token(token: str) -> str:
    """The lease token of the task claimed with the completion under `token`: derived, so a retry finds it."""
    digest = hashlib.sha256(b"helix-next:" + token.encode()).digest()[:24]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def held_by(conn: Connection, token: str, now: datetime, policy: LeasePolicy) -> tuple[Any, Lease] | None:
    """The task leased under `token` and its lease, if that lease still holds."""
    task = conn.execute(_HELD_BY, {"p_token": token}).one_or_none()
    if task is None or task.lease_expires_at is None or task.lease_expires_at < now:
        return None
    return task, Lease(task.lease_token, task.lease_expires_at, policy.ttl_seconds, policy.heartbeat_seconds)
