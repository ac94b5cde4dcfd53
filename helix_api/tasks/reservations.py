"""Fine-tune reservations: how many of a model's runners are kept free for its fine-tuning.

A runner polling for both the inference and the fine-tuning of one model is in that model's pool
(`runners.pool`). With a reservation of N, the claim rule (claims.py) lets a pool runner take inference
only while more than N of the pool's live runners are idle, so N of them are always ready for a
fine-tune. This module is the operator's side: set, remove and list reservations, each with the live
runners of its pool, so that a reservation no pool can honour is accepted but shown as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from helix_api.db import Database
from helix_api.models import Reservation, Runner, utcnow
from helix_api.tasks import runners

logger = logging.getLogger(__name__)

_RESERVATIONS, _RUNNERS = Reservation.__table__, Runner.__table__


@dataclass(frozen=True)
class Reserved:
    """One reservation and the live runners of its model's pool."""

    model_name: str
    runners: int
    pool_runners: int  # live runners polling for both the model's inference and its fine-tuning
    updated_at: datetime

    @property
    def larger_than_pool(self) -> bool:
        """Whether it keeps more runners than serve the model: then no pool runner takes inference at all."""
        return self.runners > self.pool_runners

    @property
    def warning(self) -> str | None:
        """What an operator should know about it, in words; None when the pool can honour it."""
        if not self.larger_than_pool:
            return None
        served = f"the {self.pool_runners} runner{'s' if self.pool_runners != 1 else ''}"
        return (f"reserves {self.runners} runner{'s' if self.runners != 1 else ''} for fine-tuning, more than "
                f"{served} serving both inference and fine-tuning of {self.model_name}: none of them takes "
                "inference work")

    def to_json(self) -> dict[str, Any]:
        """As the admin API shows it."""
        return {"model_name": self.model_name, "runners": self.runners, "pool_runners": self.pool_runners,
                "larger_than_pool": self.larger_than_pool, "warning": self.warning,
                "updated_at": self.updated_at.isoformat()}


def reserve(database: Database, model_name: str, count: int) -> Reserved | None:
    """Keep `count` runners of `model_name`'s pool (a full name) for fine-tuning; 0 removes the
    reservation. Returns it as it now stands (None once removed)."""
    if count < 0:
        raise ValueError(f"a reservation cannot be negative: {count}")
    if count == 0:
        remove(database, model_name)
        return None
    values = {"runners": count, "updated_at": utcnow()}
    with database.transaction() as conn:
        if not conn.execute(update(_RESERVATIONS).where(_RESERVATIONS.c.model_name == model_name)
                            .values(**values)).rowcount:
            # A savepoint, so that losing a race with another operator's insert leaves the transaction usable.
            try:
                with conn.begin_nested():
                    conn.execute(insert(_RESERVATIONS).values(model_name=model_name, **values))
            except IntegrityError:
                conn.execute(update(_RESERVATIONS).where(_RESERVATIONS.c.model_name == model_name)
                             .values(**values))
        reserved = find(conn, model_name)
    logger.info("reservation of %s set to %d runner(s)", model_name, count)
    if reserved is not None and reserved.warning:
        logger.warning("reservation of %s %s", model_name, reserved.warning)
    return reserved


def remove(database: Database, model_name: str) -> bool:
    """Remove `model_name`'s reservation; whether there was one."""
    with database.transaction() as conn:
        removed = bool(conn.execute(delete(_RESERVATIONS).where(_RESERVATIONS.c.model_name == model_name))
                       .rowcount)
    if removed:
        logger.info("reservation of %s removed", model_name)
    return removed


def listing(conn: Connection, now: datetime | None = None) -> list[Reserved]:
    """Every reservation, by model, with the live runners of its pool (on a connection, so that the
    overview reads it with the rest of its document).

    "Live" is the registry's window (runners.ALIVE_SECONDS), the one the claim rule counts with too.
    """
    since = runners.alive_since(now)
    live = (select(_RUNNERS.c.pool, func.count().label("n"))
            .where(_RUNNERS.c.pool.is_not(None), _RUNNERS.c.last_seen_at >= since)
            .group_by(_RUNNERS.c.pool).subquery("live"))
    stmt = (select(_RESERVATIONS.c.model_name, _RESERVATIONS.c.runners, _RESERVATIONS.c.updated_at,
                   func.coalesce(live.c.n, 0).label("pool_runners"))
            .outerjoin(live, live.c.pool == _RESERVATIONS.c.model_name)
            .order_by(_RESERVATIONS.c.model_name))
    return [Reserved(r.model_name, r.runners, r.pool_runners, r.updated_at) for r in conn.execute(stmt)]


def find(conn: Connection, model_name: str, now: datetime | None = None) -> Reserved | None:
    """`model_name`'s reservation, if it has one."""
    return next((r for r in listing(conn, now) if r.model_name == model_name), None)
