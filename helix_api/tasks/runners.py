"""Runners the API has heard from: recorded as they poll and report, for operators and /v1/models."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from helix_api.db import Database
from helix_api.models import ACTIVE_TASK_STATUSES, Runner, Task, utcnow

logger = logging.getLogger(__name__)

# An idle runner polls many times a second; its row is written at most this often per API process,
# so "last heard from" costs almost nothing and polling an empty queue stays free of write locks.
WRITE_EVERY_SECONDS = 5.0
# A runner unheard of for longer is shown as gone, and its model no longer counts as served.
ALIVE_SECONDS = 60.0

_RUNNERS = Runner.__table__
_REFRESH = update(_RUNNERS).where(_RUNNERS.c.name == bindparam("p_name")).values(last_seen_at=bindparam("p_seen"))
_lock = threading.Lock()
_clock = time.monotonic  # a module attribute, so tests can move it


class _Sightings:
    """One API process's record of when it last wrote each runner's row, and the refreshes not written yet.

    A runner seen for the first time, or asking for another model, is written at once. A mere "still
    here" waits, and every refresh due is written together in one transaction at most once per
    WRITE_EVERY_SECONDS: a thousand runners re-polling at once cost one write, not a thousand.
    """

    def __init__(self) -> None:
        self.written: dict[str, tuple[float, tuple[Any, ...]]] = {}
        self.pending: dict[str, datetime] = {}
        self.flushed = float("-inf")


def _sightings(database: Database) -> _Sightings:
    """This process's sightings of `database`'s runners (kept per database: tests have many)."""
    return database.__dict__.setdefault("runner_sightings", _Sightings())


def _note(database: Database, name: str, what: tuple[Any, ...]) -> bool:
    """Whether runner `name` must be written now; otherwise queue a refresh when one is due."""
    now = _clock()
    sightings = _sightings(database)
    with _lock:
        last = sightings.written.get(name)
        if last is None or last[1] != what:
            sightings.written[name] = (now, what)
            return True
        if now - last[0] >= WRITE_EVERY_SECONDS:
            sightings.written[name] = (now, what)
            sightings.pending[name] = utcnow()
        return False


def _flush(database: Database) -> None:
    """Write the refreshes waiting, in one transaction, if the last flush is old enough."""
    sightings = _sightings(database)
    with _lock:
        if not sightings.pending or _clock() - sightings.flushed < WRITE_EVERY_SECONDS:
            return
        pending, sightings.pending = sightings.pending, {}
        sightings.flushed = _clock()
    try:
        with database.transaction() as conn:
            conn.execute(_REFRESH, [{"p_name": name, "p_seen": seen_at} for name, seen_at in pending.items()])
    except Exception:
        logger.exception("recording %d runners as heard from failed", len(pending))


def seen(database: Database, name: str, *, runner_token_id: int | None, mode: Any, type_: Any,
         model_name: str) -> None:
    """Record that runner `name` asked for work of (mode, type, model); a few writes a minute at most."""
    if not _note(database, name, (mode, type_, model_name)):
        _flush(database)
        return
    now = utcnow()
    values = {"runner_token_id": runner_token_id, "mode": mode, "type": type_, "model_name": model_name,
              "last_seen_at": now}
    try:
        with database.transaction() as conn:
            if conn.execute(update(_RUNNERS).where(_RUNNERS.c.name == name).values(**values)).rowcount:
                return
            conn.execute(insert(_RUNNERS).values(name=name, first_seen_at=now, **values))
    except IntegrityError:  # another API process inserted it first: it is recorded either way
        pass
    except Exception:
        logger.exception("recording runner %s failed", name)  # never worth failing a claim over


def touched(database: Database, name: str) -> None:
    """Record that runner `name` reported on a task it holds (a heartbeat or events)."""
    sightings = _sightings(database)
    with _lock:
        last = sightings.written.get(name)
        if last is None or _clock() - last[0] >= WRITE_EVERY_SECONDS:
            # A row this process never wrote is refreshed all the same: its claim may have come
            # through another process (an UPDATE of a row that is not there changes nothing).
            sightings.written[name] = (_clock(), last[1] if last else ("touch",))
            sightings.pending[name] = utcnow()
    _flush(database)


def alive_since(now: datetime | None = None) -> datetime:
    """Runners heard from after this time count as alive."""
    return (now or utcnow()) - timedelta(seconds=ALIVE_SECONDS)


def listing(conn: Any, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every runner seen, most recently heard from first, with the tasks it holds now."""
    now = now or utcnow()
    rows = list(conn.execute(select(_RUNNERS).order_by(_RUNNERS.c.last_seen_at.desc())))
    held: dict[str, list[dict[str, Any]]] = {}
    tasks = Task.__table__
    for task in conn.execute(select(tasks.c.id, tasks.c.session_id, tasks.c.runner, tasks.c.status,
                                    tasks.c.attempt, tasks.c.lease_expires_at)
                             .where(tasks.c.status.in_(ACTIVE_TASK_STATUSES))):
        held.setdefault(task.runner, []).append({
            "task_id": task.id, "session_id": task.session_id, "status": task.status.value,
            "attempt": task.attempt,
            "lease_expires_at": task.lease_expires_at.isoformat() if task.lease_expires_at else None})
    return [{"name": r.name, "mode": r.mode.value, "type": r.type.value, "model_name": r.model_name,
             "first_seen_at": r.first_seen_at.isoformat(), "last_seen_at": r.last_seen_at.isoformat(),
             "seconds_since_seen": round((now - r.last_seen_at).total_seconds(), 1),
             "alive": r.last_seen_at >= alive_since(now), "tasks": held.get(r.name, [])} for r in rows]


def served_models(conn: Any, now: datetime | None = None) -> list[tuple[str, str, str]]:
    """(mode, type, model_name) of every runner heard from recently."""
    stmt = (select(_RUNNERS.c.mode, _RUNNERS.c.type, _RUNNERS.c.model_name)
            .where(_RUNNERS.c.last_seen_at >= alive_since(now)).distinct())
    return [(r.mode.value, r.type.value, r.model_name) for r in conn.execute(stmt)]
