"""What operators look at: the runners seen, how deep each model's queue is, fine-tune reservations, and
recent failures."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from helix_api.db import Database
from helix_api.models import FAILED_TASK_STATUSES, OPEN_TASK_STATUSES, Task, TaskStatus, User, utcnow
from helix_api.tasks import reservations, runners

_TASKS = Task.__table__


def queue_depths(conn: Any) -> list[dict[str, Any]]:
    """Per (mode, type, model): tasks queued, tasks running, and how long the oldest has waited."""
    now = utcnow()
    stmt = (select(_TASKS.c.mode, _TASKS.c.type, _TASKS.c.model_name, _TASKS.c.status,
                   func.count().label("n"), func.min(_TASKS.c.queued_at).label("oldest"))
            .where(_TASKS.c.status.in_(OPEN_TASK_STATUSES))
            .group_by(_TASKS.c.mode, _TASKS.c.type, _TASKS.c.model_name, _TASKS.c.status))
    depths: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in conn.execute(stmt):
        key = (row.mode.value, row.type.value, row.model_name)
        entry = depths.setdefault(key, {"mode": key[0], "type": key[1], "model_name": key[2], "queued": 0,
                                        "running": 0, "oldest_queued_seconds": None})
        if row.status == TaskStatus.QUEUED:
            entry["queued"] += row.n
            oldest = row.oldest if row.oldest.tzinfo else row.oldest.replace(tzinfo=now.tzinfo)
            entry["oldest_queued_seconds"] = round((now - oldest).total_seconds(), 1)
        else:
            entry["running"] += row.n
    return sorted(depths.values(), key=lambda e: (-e["queued"], e["model_name"]))


def recent_failures(conn: Any, limit: int = 20) -> list[dict[str, Any]]:
    """The last tasks that failed or died, with their errors, newest first."""
    stmt = (select(_TASKS.c.id, _TASKS.c.session_id, _TASKS.c.mode, _TASKS.c.type, _TASKS.c.model_name,
                   _TASKS.c.status, _TASKS.c.attempt, _TASKS.c.runner, _TASKS.c.error, _TASKS.c.finished_at,
                   User.name.label("user"))
            .join(User, User.id == _TASKS.c.user_id)
            .where(_TASKS.c.status.in_(FAILED_TASK_STATUSES)).order_by(_TASKS.c.finished_at.desc(), _TASKS.c.id.desc())
            .limit(limit))
    return [{"task_id": r.id, "session_id": r.session_id, "user": r.user, "mode": r.mode.value,
             "type": r.type.value, "model_name": r.model_name, "status": r.status.value, "attempts": r.attempt,
             "runner": r.runner, "error": r.error,
             "finished_at": r.finished_at.isoformat() if r.finished_at else None} for r in conn.execute(stmt)]


def runner_listing(database: Database, gone_after: float = runners.ALIVE_SECONDS) -> list[dict[str, Any]]:
    """Every runner seen, with its report; silent for longer than `gone_after` seconds: not alive."""
    with database.connect() as conn:
        return runners.listing(conn, alive_seconds=gone_after)


def reservation_listing(database: Database) -> list[dict[str, Any]]:
    """Every fine-tune reservation, with the live runners of its pool and a warning where it is larger."""
    with database.connect() as conn:
        return [r.to_json() for r in reservations.listing(conn)]


def overview(database: Database, failures: int = 20, gone_after: float = runners.ALIVE_SECONDS) -> dict[str, Any]:
    """Runners, queue depths, fine-tune reservations and recent failures in one document."""
    with database.connect() as conn:
        return {"runners": runners.listing(conn, alive_seconds=gone_after), "queues": queue_depths(conn),
                "reservations": [r.to_json() for r in reservations.listing(conn)],
                "recent_failures": recent_failures(conn, failures)}
