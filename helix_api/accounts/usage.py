"""Usage accounting: a `task_usage` row as each attempt at a task ends, and the reports read from them.

Rows are written by the scheduler in the transaction that ends the attempt, so usage and task status
never disagree. Token counts are the runner's (`result.usage`), images the files a result names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Float, bindparam, case, cast, func, insert, select

from helix_api.db import Database, Prepared
from helix_api.models import TaskUsage, User
from helix_api.vocabulary import BILLED_ATTEMPT_ENDS, FINAL_ATTEMPT_ENDS, AttemptEnd, Mode, SessionType

_USAGE, _USERS = TaskUsage.__table__, User.__table__
GROUPINGS = ("model", "day")
# Far beyond any real count, within BIGINT: a runner's absurd number must not break the insert.
_MAX_COUNT = 2**53


def counts(result: Mapping[str, Any] | None) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) a runner reported in its result; zeros for what it left out."""
    usage = (result or {}).get("usage")
    if not isinstance(usage, Mapping):
        return 0, 0
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def images_of(task: Any, result: Mapping[str, Any] | None) -> int:
    """Images a result made: the files of an image task's reply."""
    if task.mode != Mode.CREATE or task.type != SessionType.IMAGE:
        return 0
    files = (result or {}).get("files")
    return len(files) if isinstance(files, list) else 0


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return 0
    return int(min(max(value, 0), _MAX_COUNT))


def runner_seconds(task: Any, now: datetime) -> float:
    """How long the attempt held its runner: from the claim to now, or to its lease's expiry if sooner."""
    if task.claimed_at is None:
        return 0.0
    end = min(now, task.lease_expires_at) if task.lease_expires_at is not None else now
    return max((end - task.claimed_at).total_seconds(), 0.0)


def row(task: Any, outcome: AttemptEnd, now: datetime, result: Mapping[str, Any] | None = None, *,
        held: bool = True) -> dict[str, Any]:
    """The `task_usage` row of the end of `task`'s current attempt; `held` is false when no runner held it
    (a queued cancel). The task's transition writes it (tasks/transitions.py)."""
    prompt, completion = counts(result) if outcome == AttemptEnd.COMPLETE else (0, 0)
    return {
        "task_id": task.id, "session_id": task.session_id, "user_id": task.user_id, "mode": task.mode,
        "type": task.type, "model_name": task.model_name, "attempt": task.attempt, "outcome": outcome,
        "billed": outcome in BILLED_ATTEMPT_ENDS, "prompt_tokens": prompt, "completion_tokens": completion,
        "images": images_of(task, result) if outcome == AttemptEnd.COMPLETE else 0,
        "runner_seconds": runner_seconds(task, now) if held else 0.0, "finished_at": now}


_INSERT_BOUND = Prepared(insert(_USAGE).values({c.name: bindparam(f"u_{c.name}") for c in _USAGE.c if c.name != "id"}))


def record_row(conn: Connection, params: Mapping[str, Any]) -> None:
    """Insert a usage row given as `u_<column>` parameters (see `row`), where no CTE carries it (SQLite)."""
    _INSERT_BOUND.run(conn, params)


def _day(dialect: str) -> Any:
    # Days are UTC days. SQLite stores naive UTC text; PostgreSQL a timestamptz, read in UTC.
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", _USAGE.c.finished_at), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", _USAGE.c.finished_at)


def _sums() -> list[Any]:
    billed = _USAGE.c.outcome.in_([e.value for e in BILLED_ATTEMPT_ENDS])
    final = _USAGE.c.outcome.in_([e.value for e in FINAL_ATTEMPT_ENDS])
    return [
        func.coalesce(func.sum(case((final, 1), else_=0)), 0).label("tasks"),
        func.coalesce(func.sum(_USAGE.c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(_USAGE.c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(_USAGE.c.images), 0).label("images"),
        func.coalesce(func.sum(case((billed, _USAGE.c.runner_seconds), else_=cast(0, Float))), 0).label(
            "runner_seconds"),
        func.coalesce(func.sum(case((billed, cast(0, Float)), else_=_USAGE.c.runner_seconds)), 0).label(
            "unbilled_runner_seconds"),
    ]


def _figures(row: Any) -> dict[str, Any]:
    prompt, completion = int(row.prompt_tokens), int(row.completion_tokens)
    return {"tasks": int(row.tasks), "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "images": int(row.images),
            "runner_seconds": round(float(row.runner_seconds), 3),
            "unbilled_runner_seconds": round(float(row.unbilled_runner_seconds), 3)}


def report(database: Database, user_id: int, *, start: datetime | None = None, end: datetime | None = None,
           group_by: str = "model", shown: Callable[[str], str] = str) -> dict[str, Any]:
    """A user's usage from `start` (inclusive) to `end` (exclusive), per model or per UTC day, and in total.

    `shown` names a model as users see it (the catalog's: an alias, never a path).
    """
    key = _USAGE.c.model_name if group_by == "model" else _day(database.dialect)
    where = [_USAGE.c.user_id == user_id]
    if start is not None:
        where.append(_USAGE.c.finished_at >= start)
    if end is not None:
        where.append(_USAGE.c.finished_at < end)
    with database.connect() as conn:
        groups = conn.execute(select(key.label("key"), *_sums()).where(*where).group_by(key).order_by(key)).all()
        total = conn.execute(select(*_sums()).where(*where)).one()
    return {"group_by": group_by, "from": start.isoformat() if start else None,
            "to": end.isoformat() if end else None,
            "groups": [{group_by: shown(row.key) if group_by == "model" else row.key, **_figures(row)}
                       for row in groups], "total": _figures(total)}


def per_user(database: Database) -> list[dict[str, Any]]:
    """Every user's all-time totals, heaviest runner time first (the admin page)."""
    stmt = (select(_USERS.c.id, _USERS.c.name, *_sums())
            .join_from(_USERS, _USAGE, _USAGE.c.user_id == _USERS.c.id)
            .group_by(_USERS.c.id, _USERS.c.name))
    with database.connect() as conn:
        rows = conn.execute(stmt).all()
    users = [{"user_id": row.id, "user": row.name, **_figures(row)} for row in rows]
    return sorted(users, key=lambda u: (-u["runner_seconds"], u["user"]))
