"""Every change of a task's state, each written in one place: enqueue, claim, start, complete, requeue,
end with an error, and cancel.

Nothing else in helix_api writes `tasks.status` (a test holds the suite to it). A transition writes
the task, its reply interaction, the session's `state` event row and, when an attempt ends, its
`task_usage` row. On PostgreSQL that is one statement (data-modifying CTEs), so a transition costs
one round trip; SQLite has no such CTEs, so there it is a few statements in the caller's transaction.
Either way the caller's transaction holds the whole change, and its fencing (the lease checks in
leases.py, the claim rule in claims.py) decides whether it may happen at all.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Integer,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session as DBSession

from helix_api.accounts import usage
from helix_api.db import Prepared
from helix_api.errors import TooManyQueued
from helix_api.models import (
    ACTIVE_TASK_STATUSES,
    File,
    Interaction,
    InteractionState,
    Session,
    Task,
    TaskEvent,
    TaskStatus,
    TaskUsage,
    User,
    UTCDateTime,
    utcnow,
)
from helix_api.sessions import tool_calls
from helix_api.streaming import events
from helix_api.tasks import claims
from helix_api.tasks.claims import ClaimRule
from helix_api.tasks.leases import Lease
from helix_api.tasks.notifier import publish, session_topic, warm_topic
from helix_api.tasks.rows import TaskRow
from helix_api.tasks.rules import Rules
from helix_api.vocabulary import AttemptEnd, Mode, SessionType

_TASKS, _REPLIES, _SESSIONS = Task.__table__, Interaction.__table__, Session.__table__
_EVENTS, _USAGE, _FILES, _USERS = TaskEvent.__table__, TaskUsage.__table__, File.__table__, User.__table__



# Bound parameters shared by the statements below: the task, its reply and session, and the time.
_ID, _REPLY, _SESSION = bindparam("p_id", type_=Integer), bindparam("p_reply", type_=Integer), \
    bindparam("p_session", type_=Integer)
_NOW = bindparam("p_now", type_=UTCDateTime())
# The files a runner uploads for a reply (an output, an adapter), spelled with OR: prepared statements
# (db.Prepared) cannot hold an expanding IN.
def _runner_file() -> Any:
    return or_(_FILES.c.kind == "output", _FILES.c.kind == "adapter")


_EVENT_COLUMNS = ["session_id", "seq", "task_id", "interaction_id", "attempt", "kind", "data", "created_at"]


def _event_cte(values: Any) -> Any:
    """The `state` event row inserted from `values` (a select of _EVENT_COLUMNS), as a CTE (PostgreSQL only)."""
    return insert(_EVENTS).from_select(_EVENT_COLUMNS, values).returning(_EVENTS.c.id).cte("event")


def _bump_cte(session_id: Any = _SESSION) -> Any:
    """The session's event counter bumped by one, returning the new seq, as a CTE (PostgreSQL only)."""
    return (update(_SESSIONS).where(_SESSIONS.c.id == session_id)
            .values(event_seq=_SESSIONS.c.event_seq + 1).returning(_SESSIONS.c.event_seq).cte("bump"))


def _state_event_cte(seq_cte: Any) -> Any:
    """The `state` event row of a task named by parameters, numbered with the session's bumped counter."""
    return _event_cte(select(_SESSION, seq_cte.c.event_seq, _ID, _REPLY, bindparam("p_attempt", type_=Integer),
                             literal("state", String), cast(bindparam("p_event", type_=String), JSON), _NOW))


def _usage_values() -> dict[str, Any]:
    return {name: bindparam(f"u_{name}") for name in (
        "task_id", "session_id", "user_id", "mode", "type", "model_name", "attempt", "outcome", "billed",
        "prompt_tokens", "completion_tokens", "images", "runner_seconds", "finished_at")}


def _end_statement(task_values: dict[str, Any], reply_values: dict[str, Any], *, drop_files: bool) -> Any:
    """One PostgreSQL statement for an attempt that ends: the task, the reply, the event and usage rows,
    and (`drop_files`) the runner files of the reply deleted, their store keys returned."""
    task = update(_TASKS).where(_TASKS.c.id == _ID).values(**task_values).returning(_TASKS.c.id).cte("task")
    reply = (update(_REPLIES).where(_REPLIES.c.id == _REPLY).values(**reply_values)
             .returning(_REPLIES.c.id).cte("reply"))
    bump = _bump_cte()
    event = _state_event_cte(bump)
    used = insert(_USAGE).values(_usage_values()).returning(_USAGE.c.id).cte("used")
    if drop_files:
        dropped = (delete(_FILES).where(_FILES.c.interaction_id == _REPLY, _runner_file())
                   .returning(_FILES.c.path).cte("dropped"))
        return select(dropped.c.path).add_cte(task, reply, bump, event, used)
    return select(bump.c.event_seq).add_cte(task, reply, event, used)


# What each end writes, as column values; the same for both databases.
_COMPLETE_TASK = {"status": TaskStatus.COMPLETE, "result": bindparam("p_result", type_=JSON), "finished_at": _NOW,
                  "lease_expires_at": None}
_COMPLETE_REPLY = {"state": InteractionState.COMPLETE, "result": bindparam("p_result", type_=JSON),
                   "finished_at": _NOW,
                   # A result without `text` (an image, say) keeps the output streamed so far.
                   "output": func.coalesce(bindparam("p_output", type_=String), _REPLIES.c.output)}
_REQUEUE_TASK = {"status": TaskStatus.QUEUED, "error": bindparam("p_error", type_=String), "queued_at": _NOW,
                 "lease_expires_at": None, "attempt": bindparam("p_attempt_left", type_=Integer)}
# The next attempt streams the reply from the start; clients drop the partial text on this event.
_REQUEUE_REPLY = {"state": InteractionState.QUEUED, "output": "", "progress": None}
_ERROR_TASK = {"status": bindparam("p_status", type_=String(16)), "error": bindparam("p_error", type_=String),
               "finished_at": _NOW, "lease_expires_at": None}
_ERROR_REPLY = {"state": InteractionState.ERROR, "error": bindparam("p_error", type_=String), "finished_at": _NOW}
_CANCEL_TASK = {"status": TaskStatus.CANCELLED, "cancelled_at": _NOW, "finished_at": _NOW}
_CANCEL_REPLY = {"state": InteractionState.CANCELLED, "finished_at": _NOW}

_ENDS = {name: (task_values, reply_values) for name, task_values, reply_values in (
    ("complete", _COMPLETE_TASK, _COMPLETE_REPLY), ("requeue", _REQUEUE_TASK, _REQUEUE_REPLY),
    ("error", _ERROR_TASK, _ERROR_REPLY), ("cancel", _CANCEL_TASK, _CANCEL_REPLY))}
# Statements built once: on the hot paths, building a statement costs more than running it.
_PG_END = {(name, drop): Prepared(_end_statement(*values, drop_files=drop)) for name, values in _ENDS.items()
           for drop in (False, True)}
_LITE_END = {name: (Prepared(update(_TASKS).where(_TASKS.c.id == _ID).values(**task_values)),
                    Prepared(update(_REPLIES).where(_REPLIES.c.id == _REPLY).values(**reply_values)))
             for name, (task_values, reply_values) in _ENDS.items()}
_LITE_DROP = Prepared(delete(_FILES).where(_FILES.c.interaction_id == _REPLY, _runner_file())
                      .returning(_FILES.c.path))
_FINETUNED = (update(_SESSIONS).where(_SESSIONS.c.id == _SESSION)
              .values(mode=Mode.CREATE, updated_at=_NOW))


def _end(conn: Connection, name: str, task: TaskRow, now: datetime, outcome: AttemptEnd, values: dict[str, Any],
         event: dict[str, Any], *, result: dict[str, Any] | None = None, held: bool = True,
         drop_files: bool = False) -> list[str]:
    """Write the end `name` of `task`'s attempt; the store keys of runner files dropped with it."""
    params = {"p_id": task.id, "p_reply": task.interaction_id, "p_session": task.session_id, "p_now": now,
              "p_attempt": task.attempt, **values}
    params.update(_usage_params(task, outcome, now, result, held))
    if conn.dialect.name == "postgresql":
        params["p_event"] = json.dumps(event)
        rows = _PG_END[name, drop_files].rows(conn, params)
        publish(conn, session_topic(task.session_id), 0)
        return [row[0] for row in rows] if drop_files else []
    update_task, update_reply = _LITE_END[name]
    update_task.run(conn, params)
    update_reply.run(conn, params)
    dropped = [row[0] for row in _LITE_DROP.rows(conn, params)] if drop_files else []
    events.state_event(conn, task, event.pop("state"), **event)
    usage.record_row(conn, params)
    return dropped


def _usage_params(task: TaskRow, outcome: AttemptEnd, now: datetime, result: dict[str, Any] | None,
                  held: bool) -> dict[str, Any]:
    return {f"u_{name}": value for name, value in usage.row(task, outcome, now, result, held=held).items()}


# --- The transitions -------------------------------------------------------------------------------

def _under_queued_limit() -> Any:
    """SQL: the task's user has fewer tasks queued than their limit (theirs, else the operator's; 0: none)."""
    limit = func.coalesce(select(_USERS.c.max_queued).where(_USERS.c.id == bindparam("user_id")).scalar_subquery(),
                          bindparam("p_queued_limit", type_=Integer))
    queued = (select(func.count()).select_from(_TASKS)
              .where(_TASKS.c.user_id == bindparam("user_id"), _TASKS.c.status == TaskStatus.QUEUED).scalar_subquery())
    return or_(limit <= 0, queued < limit)


def _enqueue_statement(postgresql: bool) -> Prepared:
    # INSERT ... SELECT, so that the queued-task limit and the warm-routing deadline cost no statement of
    # their own: over the limit, the insert inserts nothing. warm_until is set only where some live runner
    # with a free slot holds the task's adapter (claims.warm_somewhere).
    columns = [c for c in _TASKS.c if not c.primary_key]

    def value(column: Any) -> Any:
        bound = bindparam(column.name, type_=column.type)
        if column.name == "warm_until":
            bound = case((and_(bindparam("adapter", type_=String).is_not(None),
                               claims.warm_somewhere(bindparam("adapter", type_=String))), bound), else_=None)
        return cast(bound, column.type) if postgresql else bound

    task = (insert(_TASKS).from_select([c.name for c in columns],
                                       select(*(value(c) for c in columns)).where(_under_queued_limit()))
            .returning(*_TASKS.c))
    if not postgresql:
        return Prepared(task)
    # One statement: the task and its `queued` event, numbered in its session.
    task = task.cte("task")
    bump = _bump_cte(select(task.c.session_id).scalar_subquery())
    event = _event_cte(
        select(task.c.session_id, bump.c.event_seq, task.c.id, task.c.interaction_id, task.c.attempt,
               literal("state", String), cast(bindparam("p_event", type_=String), JSON), task.c.created_at)
        .select_from(task.join(bump, literal(True))))
    return Prepared(select(*task.c).add_cte(bump, event))


_ENQUEUE = {False: _enqueue_statement(False), True: _enqueue_statement(True)}
_QUEUED_EVENT = json.dumps({"state": InteractionState.QUEUED.value})


def enqueue(db: DBSession | Connection, *, session_id: int, interaction_id: int, user_id: int, mode: Mode,
            type_: SessionType, model_name: str, input: dict[str, Any], params: dict[str, Any],
            priority: int, max_attempts: int, rules: Rules) -> TaskRow:
    """Queue the task that will produce reply `interaction_id`, in the creator's transaction.

    Raises TooManyQueued, storing nothing of its own, when the user is at their queued-task limit; the
    caller's transaction then rolls back whatever else it wrote.
    """
    now = utcnow()
    values = {
        "session_id": session_id, "interaction_id": interaction_id, "user_id": user_id, "mode": mode,
        "type": type_, "model_name": model_name, "priority": priority, "status": TaskStatus.QUEUED,
        "input": input, "params": params, "result": None, "error": None, "attempt": 0,
        "max_attempts": max_attempts, "lease_token": None, "lease_expires_at": None,
        "adapter": claims.adapter_key(input), "warm_until": rules.warm_until(now), "runner": None,
        "runner_token_id": None, "last_event_seq": 0, "created_at": now, "queued_at": now, "claimed_at": None,
        "started_at": None, "finished_at": None, "cancelled_at": None}
    postgresql = isinstance(db, Connection) and db.dialect.name == "postgresql"
    row = _ENQUEUE[postgresql].one_or_none(db, {**values, "p_event": _QUEUED_EVENT,
                                                "p_queued_limit": rules.max_queued_per_user,
                                                "p_alive": now - timedelta(seconds=claims.ALIVE_SECONDS)})
    if row is None:
        raise TooManyQueued("You already have as many tasks queued as you may (your queued-task limit): "
                            "wait for some of them to start, then try again.")
    task = TaskRow.of(row)
    if postgresql:
        publish(db, session_topic(session_id), 0)
    else:
        events.state_event(db, task, InteractionState.QUEUED.value)
    # A task held for a warm runner wakes a runner holding its adapter (a cold one could not take it);
    # any other task wakes one runner of its queue.
    publish(db, warm_topic(task.adapter) if task.warm_until is not None and task.adapter
            else ClaimRule.of_task(task).topic, 1)
    return task


def _claim_statement(rule: ClaimRule, skip_locked: bool, postgresql: bool) -> Any:
    candidate = (select(_TASKS.c.id).select_from(rule.from_()).where(rule.where())
                 .order_by(*rule.order_by()).limit(1))
    if skip_locked:
        # Concurrent claimers skip a row another transaction is taking instead of queueing on it.
        candidate = candidate.with_for_update(skip_locked=True, of=_TASKS)
    claim = (update(_TASKS)
             .where(_TASKS.c.id == candidate.scalar_subquery(), _TASKS.c.status == TaskStatus.QUEUED)
             .values(status=TaskStatus.CLAIMED, attempt=_TASKS.c.attempt + 1, lease_token=bindparam("p_token"),
                     lease_expires_at=bindparam("p_expires"), claimed_at=_NOW, started_at=None,
                     runner=bindparam("p_runner"), runner_token_id=bindparam("p_runner_token"), last_event_seq=0)
             .returning(*_TASKS.c))
    if not postgresql:
        return claim
    # One statement: the claim, the reply running, the `state` event numbered in its session, and (fair
    # shares) the user's turn taken.
    claimed = claim.cte("claimed")
    reply = (update(_REPLIES).where(_REPLIES.c.id == select(claimed.c.interaction_id).scalar_subquery())
             .values(state=InteractionState.RUNNING).returning(_REPLIES.c.id).cte("reply"))
    bump = _bump_cte(select(claimed.c.session_id).scalar_subquery())
    event = _event_cte(
        select(claimed.c.session_id, bump.c.event_seq, claimed.c.id, claimed.c.interaction_id, claimed.c.attempt,
               literal("state", String), cast(bindparam("p_event", type_=String), JSON), _NOW)
        .select_from(claimed.join(bump, literal(True))))
    ctes = [reply, bump, event]
    if rule.rules.fair_share:
        ctes.append(update(_USERS).where(_USERS.c.id == select(claimed.c.user_id).scalar_subquery())
                    .values(last_claimed_at=_NOW).returning(_USERS.c.id).cte("served"))
    return select(*claimed.c).add_cte(*ctes)


_CLAIMS: dict[tuple[Any, bool], Prepared] = {}
_REPLY_RUNNING = Prepared(update(_REPLIES).where(_REPLIES.c.id == _REPLY).values(state=InteractionState.RUNNING))
# Fair shares: the user's turn taken (SQLite; on PostgreSQL a CTE of the claim).
_SERVED = Prepared(update(_USERS).where(_USERS.c.id == bindparam("p_user")).values(last_claimed_at=_NOW))


def claim(conn: Connection, rule: ClaimRule, lease: Lease, now: datetime, *, runner: str,
          runner_token_id: int | None) -> TaskRow | None:
    """Lease the first task `rule` picks to `runner` under `lease`, in `conn`'s transaction; None if none."""
    postgresql = conn.dialect.name == "postgresql"
    key = (rule.shape, postgresql)
    stmt = _CLAIMS.get(key)
    if stmt is None:
        stmt = _CLAIMS[key] = Prepared(_claim_statement(rule, skip_locked=postgresql, postgresql=postgresql))
    event = {"state": InteractionState.RUNNING.value, "phase": "claimed", "runner": runner}
    row = stmt.one_or_none(conn, {**rule.params(now), "p_token": lease.token, "p_expires": lease.expires_at,
                                  "p_now": now, "p_runner": runner, "p_runner_token": runner_token_id,
                                  "p_event": json.dumps(event)})
    if row is None:
        return None
    task = TaskRow.of(row)
    if postgresql:
        publish(conn, session_topic(task.session_id), 0)
    else:
        _REPLY_RUNNING.run(conn, {"p_reply": task.interaction_id})
        if rule.rules.fair_share:
            _SERVED.run(conn, {"p_user": task.user_id, "p_now": now})
        events.state_event(conn, task, event.pop("state"), **event)
    return task


_START = Prepared(update(_TASKS).where(_TASKS.c.id == _ID)
          .values(status=TaskStatus.RUNNING, lease_expires_at=bindparam("p_expires"),
                  started_at=func.coalesce(_TASKS.c.started_at, _NOW)))
# A flush of streamed text: guarded by the lease and the stored seq, so two processes never store the
# same tokens twice; it renews the lease and marks the task running in the same statement.
_ADVANCE = Prepared(update(_TASKS)
            .where(_TASKS.c.id == _ID, _TASKS.c.lease_token == bindparam("p_token"),
                   claims.active(), _TASKS.c.lease_expires_at >= _NOW,
                   _TASKS.c.last_event_seq == bindparam("p_after"))
            .values(last_event_seq=bindparam("p_seq"), status=TaskStatus.RUNNING,
                    lease_expires_at=bindparam("p_expires"), started_at=func.coalesce(_TASKS.c.started_at, _NOW)))


def start(conn: Connection, task: TaskRow, now: datetime, ttl_seconds: float) -> datetime:
    """Renew a held task's lease by `ttl_seconds` (a heartbeat): it is running now. The new expiry."""
    expires = now + timedelta(seconds=ttl_seconds)
    _START.run(conn, {"p_id": task.id, "p_expires": expires, "p_now": now})
    return expires


def advance(conn: Connection, *, task_id: int, lease_token: str, now: datetime, expires: datetime,
            after_seq: int, last_seq: int) -> bool:
    """Move a running task's stored events from `after_seq` to `last_seq`, renewing its lease.

    False, changing nothing, unless the lease still holds and SQL's seq is still `after_seq`.
    """
    return bool(_ADVANCE.run(conn, {"p_id": task_id, "p_token": lease_token, "p_now": now, "p_expires": expires,
                                    "p_after": after_seq, "p_seq": last_seq})[1])


def complete(conn: Connection, task: TaskRow, result: dict[str, Any], output: str | None, now: datetime, *,
             drop_runner_files: bool) -> list[str]:
    """Store the result of `task`'s attempt (its lease checked by the caller); store keys of files dropped.

    `drop_runner_files`: the result names no file, so every file a runner uploaded for the reply goes
    (in the same statement on PostgreSQL). A fine-tune's session switches to inference here. A reply that
    calls tools gets its `tool_calls` rows: one statement more, only then.
    """
    dropped = _end(conn, "complete", task, now, AttemptEnd.COMPLETE, {"p_result": result, "p_output": output},
                   {"state": InteractionState.COMPLETE.value}, result=result, drop_files=drop_runner_files)
    tool_calls.write(conn, tool_calls.of_result(result, session_id=task.session_id,
                                                interaction_id=task.interaction_id, now=now))
    if task.mode == Mode.FINETUNE:
        conn.execute(_FINETUNED, {"p_session": task.session_id, "p_now": now})
    return dropped


def requeue(conn: Connection, task: TaskRow, now: datetime, reason: str, *, give_back: bool = False) -> TaskStatus:
    """Put `task` back in its queue after a failed, lost or handed-back attempt (`give_back`: no attempt spent).

    It keeps its id and priority, so it goes back to its old place in line, not to the end.
    """
    attempt = task.attempt - 1 if give_back else task.attempt
    _end(conn, "requeue", task, now, AttemptEnd.RELEASED if give_back else AttemptEnd.RETRIED,
         {"p_error": reason, "p_attempt_left": attempt},
         {"state": InteractionState.QUEUED.value, "reason": reason, "attempts_used": attempt})
    publish(conn, ClaimRule.of_task(task).topic, 1)
    return TaskStatus.QUEUED


def end_with_error(conn: Connection, task: TaskRow, now: datetime, status: TaskStatus, error: str) -> TaskStatus:
    """End `task` for good as `status` (failed or dead); the reply keeps its last attempt's files only."""
    _end(conn, "error", task, now, AttemptEnd(status.value), {"p_status": status.value, "p_error": error},
         {"state": InteractionState.ERROR.value, "error": error, "task_status": status.value})
    return status


_OPEN_OF_SESSION = (select(*_TASKS.c).where(_TASKS.c.session_id == _SESSION,
                                            _TASKS.c.status.in_([TaskStatus.QUEUED, *ACTIVE_TASK_STATUSES]))
                    .order_by(_TASKS.c.id.desc()).limit(1))
_OPEN = {False: _OPEN_OF_SESSION, True: _OPEN_OF_SESSION.with_for_update()}


def cancel(conn: Connection, session_id: int, now: datetime) -> TaskRow | None:
    """Cancel the session's queued or running task; None when it has none.

    The lease token stays, so the runner's next heartbeat is told "cancelled", not "lost".
    """
    row = conn.execute(_OPEN[conn.dialect.name == "postgresql"], {"p_session": session_id}).one_or_none()
    if row is None:
        return None
    task = TaskRow.of(row)
    # A queued task's claimed_at is an earlier, lost attempt's: no runner holds it now.
    _end(conn, "cancel", task, now, AttemptEnd.CANCELLED, {}, {"state": InteractionState.CANCELLED.value},
         held=task.status != TaskStatus.QUEUED)
    return task
