"""The claim rule: which queued tasks a runner may take, in what order, and what wakes it up.

A `ClaimRule` is the one description of a runner's request for work, and every scheduling rule of the
fleet is a clause of it, so the long-poll, `GET /task?max=N` and the complete-and-claim-next path all
obey them, as one SQL statement an operator can read (notes.md, "Scheduling rules"):

- **kinds**: a runner may poll for several (mode, type, model) queues at once;
- **warm routing**: a task whose adapter a live runner with a free slot held when it was queued waits
  up to `warm_until` for a runner holding that adapter; a runner takes its own adapters' work first;
- **ageing**: a new session queued longer than `Rules.ageing_seconds` goes before continue work;
- **fair shares**: within a priority class, the user with the fewest tasks running goes first, and
  among those the one served longest ago (`users.last_claimed_at`, written by the claim);
- **per-user running limit**: a user at their limit gets nothing more until a task ends;
- **fine-tune reservation**: runners polling for both a model's inference and its fine-tuning take
  inference only while more of them are idle than the model's reservation keeps.

Everything a rule reads is in SQL (tasks, users, runners, reservations), so API replicas share it.
The claim statement itself, built from the rule, is in transitions.py; the lease token a `complete`
derives for the next task is here.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Integer,
    String,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal,
    not_,
    or_,
    select,
)

from helix_api.db import Prepared
from helix_api.models import ACTIVE_TASK_STATUSES, Reservation, Runner, Task, TaskStatus, User
from helix_api.tasks.leases import Lease, LeasePolicy
from helix_api.tasks.notifier import queue_topic, warm_topic
from helix_api.tasks.rows import TaskRow
from helix_api.tasks.rules import Rules
from helix_api.tasks.runners import ALIVE_SECONDS  # warm routing and reservations count runners alive as all else does
from helix_api.vocabulary import Mode, SessionType

_TASKS, _USERS, _RUNNERS, _RESERVATIONS = Task.__table__, User.__table__, Runner.__table__, Reservation.__table__

# Lower goes first: a user already in a chat is waiting on every reply.
PRIORITY_CONTINUE = 0
PRIORITY_NEW = 1
# Where an aged new session sorts: before continue work.
_PRIORITY_AGED = -1
_NO_LIMIT = 2**31 - 1
# Adapter keys are checksums (or file ids): anything else is never matched inside the runners' JSON.
ADAPTER_KEY = re.compile(r"[0-9A-Za-z-]{1,128}")


def _in_queue(index: int) -> Any:
    """Tasks waiting in the rule's `index`-th kind: the only place the (mode, type, model) triple is spelled."""
    return and_(_TASKS.c.mode == bindparam(f"p_mode{index}"), _TASKS.c.type == bindparam(f"p_type{index}"),
                _TASKS.c.model_name == bindparam(f"p_model{index}"))


def queued_in(kinds: int) -> Any:
    """Tasks waiting in any of a rule's first `kinds` queues."""
    return and_(_TASKS.c.status == TaskStatus.QUEUED, or_(*(_in_queue(index) for index in range(kinds))))


def active(tasks: Any = _TASKS) -> Any:
    """Tasks claimed or running, spelled with OR: prepared statements (db.Prepared) cannot hold an
    expanding IN."""
    return or_(*(tasks.c.status == status for status in sorted(ACTIVE_TASK_STATUSES)))


# The tasks waiting in one queue (a one-kind rule's), for a task's place in line.
QUEUED = queued_in(1)


@dataclass(frozen=True)
class Kind:
    """One queue: the tasks of one mode, type and model."""

    mode: Mode
    type: SessionType
    model_name: str

    @property
    def topic(self) -> str:
        """The wake-up topic of this queue's runners: a task they may take was queued."""
        return queue_topic(self.mode.value, self.type.value, self.model_name)


@dataclass(frozen=True)
class ClaimRule:
    """What a runner may take: its filter, its ordering and its wake-up topics.

    `kinds` are the queues it polls; `warm` the adapter keys it holds in memory. The claim binds the
    runner's name (`p_runner`), through which the rule finds its pool in SQL. A runner polling for both
    the inference and the fine-tuning of one model is in that model's pool (`pool`), where a fine-tune
    reservation applies.
    """

    kinds: tuple[Kind, ...]
    warm: tuple[str, ...] = ()
    rules: Rules = field(default_factory=Rules)

    @classmethod
    def one(cls, mode: Mode, type_: SessionType, model_name: str, **kwargs: Any) -> ClaimRule:
        """The rule of a runner polling one queue."""
        return cls((Kind(mode, type_, model_name),), **kwargs)

    @classmethod
    def of_task(cls, task: Any) -> ClaimRule:
        """The rule of the runners that may take `task` (whose queue it joins)."""
        return cls.one(task.mode, task.type, task.model_name)

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ValueError("a claim rule needs at least one kind")
        object.__setattr__(self, "warm", tuple(key for key in dict.fromkeys(self.warm) if ADAPTER_KEY.fullmatch(key)))

    @property
    def mode(self) -> Mode:
        return self.kinds[0].mode

    @property
    def type(self) -> SessionType:
        return self.kinds[0].type

    @property
    def model_name(self) -> str:
        return self.kinds[0].model_name

    @property
    def topic(self) -> str:
        """The first kind's wake-up topic (a one-kind rule's only one)."""
        return self.kinds[0].topic

    @property
    def topics(self) -> tuple[str, ...]:
        """Every wake-up topic of this rule's runner: a task of any of its kinds was queued, or a task held
        for a runner with one of its adapters."""
        return tuple(dict.fromkeys([*(kind.topic for kind in self.kinds), *map(warm_topic, self.warm)]))

    @property
    def pool(self) -> str | None:
        """The model whose inference and fine-tuning this rule polls for together, if any."""
        modes: dict[tuple[SessionType, str], set[Mode]] = {}
        for kind in self.kinds:
            modes.setdefault((kind.type, kind.model_name), set()).add(kind.mode)
        for (_, model_name), seen in modes.items():
            if {Mode.CREATE, Mode.FINETUNE} <= seen:
                return model_name
        return None

    @property
    def shape(self) -> tuple[Any, ...]:
        """What the rule's SQL depends on besides its parameters: statements are built once per shape."""
        return (len(self.kinds), len(self.warm), self.rules.fair_share, self.rules.ageing_seconds > 0)

    def where(self) -> Any:
        """The filter: the queued tasks this rule may take, its values bound by `params()`."""
        running = _RUNNING
        clauses = [queued_in(len(self.kinds)),
                   # Warm routing: a task waiting for a warm runner is this runner's only if it holds the adapter.
                   or_(_TASKS.c.warm_until.is_(None), _TASKS.c.warm_until <= bindparam("p_now"), self._is_warm()),
                   # The user's running limit (theirs, else the operator's; 0: none).
                   func.coalesce(running.c.n, 0) < _running_limit(),
                   # The fine-tune reservation of the runner's pool, read from its row (so the complete-and-
                   # claim-next path, which knows only the runner's name, obeys it too).
                   or_(_TASKS.c.mode != Mode.CREATE, _POOL.is_(None), _reserved() <= 0,
                       _idle_in_pool() > _reserved())]
        return and_(*clauses)

    def order_by(self) -> tuple[Any, ...]:
        """The ordering: which of those goes first."""
        order: list[Any] = []
        if self.rules.ageing_seconds > 0:
            order.append(case((and_(_TASKS.c.priority == PRIORITY_NEW, _TASKS.c.queued_at < bindparam("p_aged")),
                               literal(_PRIORITY_AGED)), else_=_TASKS.c.priority))
        else:
            order.append(_TASKS.c.priority)
        if self.warm:
            order.append(case((self._is_warm(), 0), else_=1))
        if self.rules.fair_share:
            order += [func.coalesce(_RUNNING.c.n, 0), _USERS.c.last_claimed_at.asc().nulls_first()]
        order.append(_TASKS.c.id)
        return tuple(order)

    def from_(self) -> Any:
        """The tasks joined with what the filter reads: each user's running count and limit."""
        running = _RUNNING
        return (_TASKS.outerjoin(running, running.c.user_id == _TASKS.c.user_id)
                .join(_USERS, _USERS.c.id == _TASKS.c.user_id))

    def _is_warm(self) -> Any:
        if not self.warm:
            return literal(False)
        return _TASKS.c.adapter.in_([bindparam(f"p_warm{index}") for index in range(len(self.warm))])

    def params(self, now: datetime) -> dict[str, Any]:
        """The bound parameters of `where()` and `order_by()` at `now`."""
        params: dict[str, Any] = {"p_now": now, "p_running_limit": self.rules.max_running_per_user,
                                  "p_aged": now - timedelta(seconds=self.rules.ageing_seconds),
                                  "p_alive": now - timedelta(seconds=ALIVE_SECONDS)}
        params.update(self.queue_params())
        params.update({f"p_warm{index}": key for index, key in enumerate(self.warm)})
        return params

    def queue_params(self) -> dict[str, Any]:
        """The bound parameters naming the rule's queues."""
        params: dict[str, Any] = {}
        for index, kind in enumerate(self.kinds):
            params.update({f"p_mode{index}": kind.mode, f"p_type{index}": kind.type,
                           f"p_model{index}": kind.model_name})
        return params

    def has_work(self, conn: Any) -> bool:
        """Whether any of its queues holds a task: idle polls read this and take no write lock.

        It reads the queues alone, not every rule: a task held back (for a warm runner, a limit, a
        reservation) still answers yes, and the claim then finds nothing, which is cheap and rare.
        """
        stmt = _HAS_WORK.get(len(self.kinds))
        if stmt is None:
            stmt = _HAS_WORK[len(self.kinds)] = Prepared(select(exists().where(queued_in(len(self.kinds)))))
        row = stmt.one_or_none(conn, self.queue_params())
        return bool(row and row[0])


_HAS_WORK: dict[int, Prepared] = {}


def _running_counts() -> Any:
    """Each user's tasks claimed or running, as a subquery joined by user_id."""
    running = _TASKS.alias("running")
    return (select(running.c.user_id, func.count().label("n"))
            .where(active(running))
            .group_by(running.c.user_id).subquery("running_counts"))


_RUNNING = _running_counts()


def _running_limit() -> Any:
    """The user's running limit, from their row, else the operator's default; no limit at 0."""
    limit = func.coalesce(_USERS.c.max_running, bindparam("p_running_limit", type_=Integer))
    return case((limit <= 0, literal(_NO_LIMIT)), else_=limit)


# The pool of the runner claiming (`p_runner`): the model whose inference and fine-tuning it polls for.
_POOL = select(_RUNNERS.c.pool).where(_RUNNERS.c.name == bindparam("p_runner")).scalar_subquery()


def _idle_in_pool() -> Any:
    """Live runners of the claiming runner's pool holding no task."""
    held = _TASKS.alias("held")
    busy = exists().where(held.c.runner == _RUNNERS.c.name, active(held))
    return (select(func.count()).select_from(_RUNNERS)
            .where(_RUNNERS.c.pool == _POOL, _RUNNERS.c.last_seen_at >= bindparam("p_alive"),
                   not_(busy)).scalar_subquery())


def _reserved() -> Any:
    """How many of the pool's runners are kept for fine-tuning (0 without a reservation)."""
    return func.coalesce(select(_RESERVATIONS.c.runners)
                         .where(_RESERVATIONS.c.model_name == _POOL).scalar_subquery(), 0)


def next_token(token: str) -> str:
    """The lease token of the task claimed with the completion under `token`: derived, so a retry finds it."""
    digest = hashlib.sha256(b"helix-next:" + token.encode()).digest()[:24]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


# The task a `complete` claimed next, found again by the lease token derived from the completed one.
_HELD_BY = select(*_TASKS.c).where(_TASKS.c.status.in_(ACTIVE_TASK_STATUSES),
                                   _TASKS.c.lease_token == bindparam("p_token"))


def held_by(conn: Any, token: str, now: datetime, policy: LeasePolicy) -> tuple[TaskRow, Lease] | None:
    """The task leased under `token` and its lease, if that lease still holds."""
    row = conn.execute(_HELD_BY, {"p_token": token}).one_or_none()
    if row is None or row.lease_expires_at is None or row.lease_expires_at < now:
        return None
    return TaskRow.of(row), Lease(row.lease_token, row.lease_expires_at, policy.ttl_seconds, policy.heartbeat_seconds)


def adapter_key(task_input: Mapping[str, Any]) -> str | None:
    """The key of the adapter a task's input names (its checksum, else its file id), if any."""
    ref = task_input.get("adapter")
    if not isinstance(ref, Mapping):
        return None
    key = str(ref.get("sha256") or ref.get("id") or "")
    return key if ADAPTER_KEY.fullmatch(key) else None


def warm_somewhere(adapter: Any) -> Any:
    """SQL: some live runner with a free slot reported holding `adapter` (a bound key): its JSON list of
    keys holds the quoted key (keys are checked to hold no LIKE wildcards or quotes)."""
    return exists().where(
        _RUNNERS.c.last_seen_at >= bindparam("p_alive"),
        func.coalesce(_RUNNERS.c.slots_busy, 0) < func.coalesce(_RUNNERS.c.slots_total, 1),
        cast(_RUNNERS.c.adapters, String).like(literal('%"') + adapter + literal('"%')))
