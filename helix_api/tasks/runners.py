"""Runners the API has heard from: recorded as they poll and report, for operators and /v1/models."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from helix_api.db import Database
from helix_api.models import ACTIVE_TASK_STATUSES, Mode, Runner, SessionType, Task, utcnow

logger = logging.getLogger(__name__)

# An idle runner polls many times a second; its row is written at most this often per API process,
# so "last heard from" costs almost nothing and polling an empty queue stays free of write locks.
WRITE_EVERY_SECONDS = 5.0
# A runner unheard of for longer is shown as gone, and its model no longer counts as served.
ALIVE_SECONDS = 60.0

_RUNNERS = Runner.__table__
_REFRESH = update(_RUNNERS).where(_RUNNERS.c.name == bindparam("p_name")).values(last_seen_at=bindparam("p_seen"))


class Registry:
    """One API process's record of the runners it hears from, written to the `runners` table.

    A runner seen for the first time, or asking for other work, is written at once. A mere "still
    here" waits, and every refresh due is written together in one transaction at most once per
    WRITE_EVERY_SECONDS: a thousand runners re-polling at once cost one write, not a thousand. The
    scheduler owns one, and records sightings on its claim and heartbeat paths.
    """

    def __init__(self, database: Database, clock: Callable[[], float] = time.monotonic) -> None:
        self.database, self.clock = database, clock
        self._lock = threading.Lock()
        self.written: dict[str, tuple[float, tuple[Any, ...]]] = {}
        self.pending: dict[str, datetime] = {}
        self.flushed = float("-inf")
        self.reports_written: dict[str, float] = {}  # runner -> when this process last stored its report

    def seen(self, name: str, *, runner_token_id: int | None, asks_for: tuple[Any, ...]) -> None:
        """Record that runner `name` asked for work (`asks_for`: mode, type, model of its first kind, and the
        model whose inference and fine-tuning it polls for together, or None); a few writes a minute."""
        if not self._note(name, asks_for):
            self._flush()
            return
        mode, type_, model_name, pool = asks_for
        now = utcnow()
        values = {"runner_token_id": runner_token_id, "mode": mode, "type": type_, "model_name": model_name,
                  "pool": pool, "last_seen_at": now}
        try:
            with self.database.transaction() as conn:
                if conn.execute(update(_RUNNERS).where(_RUNNERS.c.name == name).values(**values)).rowcount:
                    return
                conn.execute(insert(_RUNNERS).values(name=name, first_seen_at=now, **values))
        except IntegrityError:  # another API process inserted it first: it is recorded either way
            pass
        except Exception:
            logger.exception("recording runner %s failed", name)  # never worth failing a claim over

    def report(self, name: str, report: dict[str, Any], *, runner_token_id: int | None) -> None:
        """Store runner `name`'s report of itself (a checked RunnerReport): one UPDATE, or an INSERT for a
        runner never seen (its first kind fills the columns a poll would)."""
        now = utcnow()
        slots = report["slots"]
        values = {"hardware": report["hardware"], "backend": report["backend"], "kinds": report["kinds"],
                  "slots_total": slots["total"], "slots_busy": slots["busy"], "adapters": report.get("adapters", []),
                  "version": report["version"], "reported_at": now, "last_seen_at": now}
        with self._lock:
            self.reports_written[name] = self.clock()
        for _ in range(2):
            try:
                with self.database.transaction() as conn:
                    if conn.execute(update(_RUNNERS).where(_RUNNERS.c.name == name).values(**values)).rowcount:
                        return
                    first = report["kinds"][0]
                    conn.execute(insert(_RUNNERS).values(
                        name=name, runner_token_id=runner_token_id, mode=Mode(first["mode"]),
                        type=SessionType(first["type"]), model_name=first["model_name"], first_seen_at=now, **values))
                    return
            except IntegrityError:  # another API process inserted it meanwhile: update that row instead
                continue
        logger.warning("runner %s's report was not stored: its row kept changing under it", name)

    def reported(self, name: str, report: dict[str, Any], *, runner_token_id: int | None) -> None:
        """A report that came with a heartbeat: stored at most once per WRITE_EVERY_SECONDS per runner (the
        figures move slowly; heartbeats of many slots come often); in between it counts as a sighting."""
        with self._lock:
            last = self.reports_written.get(name)
            due = last is None or self.clock() - last >= WRITE_EVERY_SECONDS
        if not due:
            self.touched(name)
            return
        try:
            self.report(name, report, runner_token_id=runner_token_id)
        except Exception:
            logger.exception("storing runner %s's report failed", name)  # never worth failing a heartbeat over

    def touched(self, name: str) -> None:
        """Record that runner `name` reported on a task it holds (a heartbeat or events)."""
        with self._lock:
            last = self.written.get(name)
            if last is None or self.clock() - last[0] >= WRITE_EVERY_SECONDS:
                # A row this process never wrote is refreshed all the same: its claim may have come
                # through another process (an UPDATE of a row that is not there changes nothing).
                self.written[name] = (self.clock(), last[1] if last else ("touch",))
                self.pending[name] = utcnow()
        self._flush()

    def _note(self, name: str, what: tuple[Any, ...]) -> bool:
        """Whether runner `name` must be written now; otherwise queue a refresh when one is due."""
        now = self.clock()
        with self._lock:
            last = self.written.get(name)
            if last is None or last[1] != what:
                self.written[name] = (now, what)
                return True
            if now - last[0] >= WRITE_EVERY_SECONDS:
                self.written[name] = (now, what)
                self.pending[name] = utcnow()
            return False

    def _flush(self) -> None:
        """Write the refreshes waiting, in one transaction, if the last flush is old enough."""
        with self._lock:
            if not self.pending or self.clock() - self.flushed < WRITE_EVERY_SECONDS:
                return
            pending, self.pending = self.pending, {}
            self.flushed = self.clock()
        try:
            with self.database.transaction() as conn:
                conn.execute(_REFRESH, [{"p_name": name, "p_seen": seen_at} for name, seen_at in pending.items()])
        except Exception:
            logger.exception("recording %d runners as heard from failed", len(pending))


def alive_since(now: datetime | None = None, seconds: float = ALIVE_SECONDS) -> datetime:
    """Runners heard from after this time count as alive."""
    return (now or utcnow()) - timedelta(seconds=seconds)


def gone_after(settings: Mapping[str, Any]) -> float:
    """Seconds of silence after which operators see a runner as gone: a lease (LEASE_SECONDS).

    An idle runner is heard from only as each long poll starts, and its sighting may wait WRITE_EVERY_SECONDS
    to be written, so the window is at least a long poll (MAX_WAIT_SECONDS) and always adds that interval:
    otherwise every idle runner would blink "gone" between two polls.
    """
    return max(float(settings["LEASE_SECONDS"]), float(settings["MAX_WAIT_SECONDS"])) + WRITE_EVERY_SECONDS


def _report_json(r: Any) -> dict[str, Any]:
    """A row's report columns, as the admin API shows them; None where the runner never reported."""
    slots = None
    if r.slots_total is not None:
        busy = r.slots_busy or 0
        slots = {"total": r.slots_total, "busy": busy, "free": max(0, r.slots_total - busy)}
    return {"hardware": r.hardware, "backend": r.backend, "kinds": r.kinds, "slots": slots,
            "adapters": r.adapters, "version": r.version,
            "reported_at": r.reported_at.isoformat() if r.reported_at else None}


def listing(conn: Any, now: datetime | None = None, alive_seconds: float = ALIVE_SECONDS) -> list[dict[str, Any]]:
    """Every runner seen, most recently heard from first, with what it reported and the tasks it holds now."""
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
    return [{"name": r.name, "mode": r.mode.value, "type": r.type.value, "model_name": r.model_name, "pool": r.pool,
             "first_seen_at": r.first_seen_at.isoformat(), "last_seen_at": r.last_seen_at.isoformat(),
             "seconds_since_seen": round((now - r.last_seen_at).total_seconds(), 1),
             "alive": r.last_seen_at >= alive_since(now, alive_seconds), **_report_json(r),
             "tasks": held.get(r.name, [])} for r in rows]


def served_models(conn: Any, now: datetime | None = None) -> list[tuple[str, str, str]]:
    """(mode, type, model_name) of every runner heard from recently."""
    stmt = (select(_RUNNERS.c.mode, _RUNNERS.c.type, _RUNNERS.c.model_name)
            .where(_RUNNERS.c.last_seen_at >= alive_since(now)).distinct())
    return [(r.mode.value, r.type.value, r.model_name) for r in conn.execute(stmt)]
