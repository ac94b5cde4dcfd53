"""Estimates: when a queued task should start, and how many runners each kind of task wants.

Everything is read from SQL at the moment it is asked for (nothing is written, nothing is kept between
requests), from three things per kind (mode, type, model):

- the **service time** `S`: the mean `task_usage.runner_seconds` (claim to end) of the attempts that
  completed in the last `SERVICE_WINDOW_SECONDS`; without any, `DEFAULT_SERVICE_SECONDS` of the mode;
- the **shop**: the live runners that serve the kind (`runners.kinds`, else the legacy mode/type/model
  columns), their slots `C` (`slots_total`, 1 for a runner that never reported) and the free ones `F`
  (reported free slots, at most `C` less the kind's running tasks);
- the **work**: the kind's queued tasks `Q`, running tasks `R` and the longest a running one has run `E`,
  and a task's place in line `p` (queues.queue_position).

A task's wait: 0 when `p <= F`; otherwise it needs the `n = p - F`-th slot to come free:
`wait = first + (n - 1) * S / C`, with `first = max(0, S - E)` (the oldest running task ends first)
or `S / 2` when the kind has nothing running. Runners wanted, for a target wait `T`: the slots that start
the last queued task within `T`, `slots = max(R, ceil((Q + R) * S / (S + T)))` (0 when `Q + R = 0`),
in runners of the kind's mean slots per runner. notes.md, "Capacity and autoscaling", says the same.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, cast, func, or_, select

from helix_api.models import ACTIVE_TASK_STATUSES, OPEN_TASK_STATUSES, Runner, Task, TaskStatus, TaskUsage, utcnow
from helix_api.tasks import queues
from helix_api.tasks.runners import alive_since
from helix_api.vocabulary import AttemptEnd, Mode, SessionType

logger = logging.getLogger(__name__)

# Completed attempts this recent make a kind's service time: long enough to hold a few, short enough
# to follow a model that got slower (longer prompts, a busier GPU).
SERVICE_WINDOW_SECONDS = 3600.0
# A kind with no completed attempt in the window: a guess, per mode (a fine-tune runs for minutes).
DEFAULT_SERVICE_SECONDS = {Mode.CREATE.value: 10.0, Mode.FINETUNE.value: 600.0}
# How often a follower of a queued reply gets a fresh `estimate` event.
ESTIMATE_EVERY_SECONDS = 5.0
NO_RUNNER = "no_runner"
NO_RUNNER_TEXT = "no runner serves this model"

_RUNNERS, _TASKS, _USAGE = Runner.__table__, Task.__table__, TaskUsage.__table__

KindKey = tuple[str, str, str]  # (mode, type, model_name), as strings


def kind_of(row: Any) -> KindKey:
    """The (mode, type, model_name) of a task, usage or runner row, as strings."""
    return (_text(row.mode), _text(row.type), row.model_name)


def _text(value: Any) -> str:
    return value.value if hasattr(value, "value") else str(value)


@dataclass(frozen=True)
class Shop:
    """One kind's fleet and work, as SQL has it now."""

    kind: KindKey
    runners: int = 0
    slots: int = 0
    reported_free: int = 0
    queued: int = 0
    running: int = 0
    longest_running_seconds: float = 0.0
    service_seconds: float = 0.0
    service_samples: int = 0

    @property
    def free_slots(self) -> int:
        """Slots that could take a task now: reported free, but never more than the kind's running tasks leave."""
        return max(0, min(self.reported_free, self.slots - self.running))

    def wait_seconds(self, position: int) -> float | None:
        """Seconds until the task at `position` (1: next) starts; None when no live runner serves the kind."""
        if self.runners == 0:
            return None
        needed = position - self.free_slots
        if needed <= 0:
            return 0.0
        service = self.service_seconds
        first = max(0.0, service - self.longest_running_seconds) if self.running else service / 2
        return first + (needed - 1) * service / max(1, self.slots)

    def slots_wanted(self, target_wait: float) -> int:
        """Slots that start the last queued task within `target_wait` seconds, the running ones kept."""
        work = self.queued + self.running
        if work == 0:
            return 0
        service = max(self.service_seconds, 1e-3)
        return max(self.running, math.ceil(work * service / (service + max(0.0, target_wait))))

    def runners_wanted(self, target_wait: float) -> int:
        """Runners for `slots_wanted`, of as many slots as this kind's live runners have on average."""
        per_runner = self.slots / self.runners if self.runners else 1.0
        return math.ceil(self.slots_wanted(target_wait) / max(per_runner, 1.0))

    def to_json(self, target_wait: float) -> dict[str, Any]:
        """The kind's figures as the capacity API shows them."""
        mode, type_, model_name = self.kind
        return {"mode": mode, "type": type_, "model_name": model_name, "queued": self.queued,
                "running": self.running, "runners_live": self.runners, "slots": self.slots,
                "free_slots": self.free_slots, "service_seconds": round(self.service_seconds, 3),
                "service_samples": self.service_samples, "runners_wanted": self.runners_wanted(target_wait),
                "target_wait_seconds": target_wait}


@dataclass(frozen=True)
class Estimate:
    """A queued task's outlook: its place in line and when it should start, or that nothing serves it."""

    phase: str  # "queued", or NO_RUNNER once the task has waited its grace with no live runner for it
    queue_position: int
    wait_seconds: float | None
    start_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        """The fields a queued reply carries in the session JSON and in `estimate` events."""
        body: dict[str, Any] = {
            "phase": self.phase, "queue_position": self.queue_position,
            "estimated_wait_seconds": None if self.wait_seconds is None else round(self.wait_seconds, 1),
            "estimated_start_at": self.start_at.isoformat() if self.start_at else None}
        if self.phase == NO_RUNNER:
            body["phase_detail"] = NO_RUNNER_TEXT
        return body


# Reading the shop.


def _served(row: Any) -> set[KindKey]:
    """The kinds a runner row serves: what it reported, else the kind its polls asked for."""
    kinds = {kind_of(row)}
    for entry in row.kinds or []:
        if isinstance(entry, dict) and {"mode", "type", "model_name"} <= entry.keys():
            kinds.add((str(entry["mode"]), str(entry["type"]), str(entry["model_name"])))
    return kinds


def _live_runners(conn: Any, now: datetime, model_name: str | None = None) -> list[Any]:
    stmt = (select(_RUNNERS.c.mode, _RUNNERS.c.type, _RUNNERS.c.model_name, _RUNNERS.c.kinds,
                   _RUNNERS.c.slots_total, _RUNNERS.c.slots_busy)
            .where(_RUNNERS.c.last_seen_at >= alive_since(now)))
    # One model's runners: narrowed in SQL where the name reads the same inside the kinds' JSON text.
    if model_name is not None and json.dumps(model_name)[1:-1] == model_name:
        stmt = stmt.where(or_(_RUNNERS.c.model_name == model_name,
                              cast(_RUNNERS.c.kinds, String).contains(model_name, autoescape=True)))
    return list(conn.execute(stmt))


def _fleet(rows: Iterable[Any]) -> dict[KindKey, tuple[int, int, int]]:
    """Per kind served: (runners, slots, slots reported free)."""
    fleet: dict[KindKey, tuple[int, int, int]] = {}
    for row in rows:
        total = row.slots_total if row.slots_total else 1
        free = max(0, total - (row.slots_busy or 0))
        for kind in _served(row):
            runners, slots, free_now = fleet.get(kind, (0, 0, 0))
            fleet[kind] = (runners + 1, slots + total, free_now + free)
    return fleet


def _kind_filter(table: Any, kind: KindKey) -> list[Any]:
    mode, type_, model_name = kind
    return [table.c.mode == Mode(mode), table.c.type == SessionType(type_), table.c.model_name == model_name]


def _work(conn: Any, now: datetime, kind: KindKey | None = None) -> dict[KindKey, tuple[int, int, float]]:
    """Per kind with open tasks: (queued, running, seconds the longest running one has run)."""
    stmt = (select(_TASKS.c.mode, _TASKS.c.type, _TASKS.c.model_name, _TASKS.c.status,
                   func.count().label("n"), func.min(_TASKS.c.claimed_at).label("first_claim"))
            .where(_TASKS.c.status.in_(OPEN_TASK_STATUSES if kind is None else ACTIVE_TASK_STATUSES))
            .group_by(_TASKS.c.mode, _TASKS.c.type, _TASKS.c.model_name, _TASKS.c.status))
    if kind is not None:
        stmt = stmt.where(*_kind_filter(_TASKS, kind))
    work: dict[KindKey, tuple[int, int, float]] = {}
    for row in conn.execute(stmt):
        queued, running, longest = work.get(kind_of(row), (0, 0, 0.0))
        if row.status == TaskStatus.QUEUED:
            queued += row.n
        else:
            running += row.n
            if row.first_claim is not None:
                first = row.first_claim if row.first_claim.tzinfo else row.first_claim.replace(tzinfo=now.tzinfo)
                longest = max(longest, (now - first).total_seconds())
        work[kind_of(row)] = (queued, running, longest)
    return work


def _service(conn: Any, now: datetime, kind: KindKey | None = None) -> dict[KindKey, tuple[float, int]]:
    """Per kind: (mean runner seconds, attempts) of the attempts completed within the window."""
    stmt = (select(_USAGE.c.mode, _USAGE.c.type, _USAGE.c.model_name,
                   func.avg(_USAGE.c.runner_seconds).label("mean"), func.count().label("n"))
            .where(_USAGE.c.finished_at >= now - timedelta(seconds=SERVICE_WINDOW_SECONDS),
                   _USAGE.c.outcome == AttemptEnd.COMPLETE)
            .group_by(_USAGE.c.mode, _USAGE.c.type, _USAGE.c.model_name))
    if kind is not None:
        stmt = stmt.where(*_kind_filter(_USAGE, kind))
    return {kind_of(row): (float(row.mean or 0.0), int(row.n)) for row in conn.execute(stmt)}


def _shop(kind: KindKey, fleet: dict[KindKey, tuple[int, int, int]], work: dict[KindKey, tuple[int, int, float]],
          service: dict[KindKey, tuple[float, int]]) -> Shop:
    runners, slots, free = fleet.get(kind, (0, 0, 0))
    queued, running, longest = work.get(kind, (0, 0, 0.0))
    mean, samples = service.get(kind, (0.0, 0))
    if samples == 0:
        mean = DEFAULT_SERVICE_SECONDS.get(kind[0], DEFAULT_SERVICE_SECONDS[Mode.CREATE.value])
    return Shop(kind, runners=runners, slots=slots, reported_free=free, queued=queued, running=running,
                longest_running_seconds=longest, service_seconds=mean, service_samples=samples)


def shop(conn: Any, kind: KindKey, now: datetime | None = None) -> Shop:
    """One kind's shop: three indexed reads (live runners, running tasks, recent service times)."""
    now = now or utcnow()
    return _shop(kind, _fleet(_live_runners(conn, now, kind[2])), _work(conn, now, kind), _service(conn, now, kind))


def shops(conn: Any, now: datetime | None = None) -> list[Shop]:
    """Every kind with open tasks or a live runner, busiest first: three reads in all."""
    now = now or utcnow()
    fleet, work, service = _fleet(_live_runners(conn, now)), _work(conn, now), _service(conn, now)
    kinds = sorted(set(fleet) | set(work), key=lambda k: (-work.get(k, (0, 0, 0.0))[0], k))
    return [_shop(kind, fleet, work, service) for kind in kinds]


# A queued task's outlook.


def estimate(conn: Any, task: Any, *, grace: float, now: datetime | None = None) -> Estimate:
    """The outlook of queued `task`: its place in line, its estimated start, or NO_RUNNER once it has
    waited `grace` seconds (since it was queued) with no live runner serving its kind."""
    now = now or utcnow()
    position = queues.queue_position(conn, task)
    found = shop(conn, kind_of(task), now)
    wait = found.wait_seconds(position)
    if wait is None:
        queued_at = task.queued_at if task.queued_at.tzinfo else task.queued_at.replace(tzinfo=now.tzinfo)
        waited = (now - queued_at).total_seconds()
        return Estimate(NO_RUNNER if waited >= grace else "queued", position, None, None)
    return Estimate("queued", position, wait, now + timedelta(seconds=wait))


def of_session(conn: Any, session_id: int, *, grace: float, now: datetime | None = None) -> tuple[Any, Estimate] | None:
    """The session's queued task and its outlook, or None when nothing of it is queued."""
    task = conn.execute(select(_TASKS).where(_TASKS.c.session_id == session_id,
                                             _TASKS.c.status == TaskStatus.QUEUED)
                        .order_by(_TASKS.c.id.desc()).limit(1)).one_or_none()
    if task is None:
        return None
    return task, estimate(conn, task, grace=grace, now=now)


def serves(conn: Any, kind: KindKey, now: datetime | None = None) -> bool:
    """Whether a live runner serves `kind`."""
    now = now or utcnow()
    return kind in _fleet(_live_runners(conn, now, kind[2]))
