"""A user's task limits: their own overrides of the operator's defaults, read and set in SQL.

The limits themselves are enforced elsewhere, in SQL too: the queued-task limit by the enqueue's insert
(tasks/transitions.py), the running-task limit by the claim rule (tasks/claims.py). Both read
`users.max_queued` / `users.max_running` (None: the operator's MAX_QUEUED_PER_USER /
MAX_RUNNING_PER_USER; 0: no limit), so a change here holds from the next enqueue or claim, in every
API process, without a restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, update

from helix_api.db import Database
from helix_api.errors import NotFound
from helix_api.models import ACTIVE_TASK_STATUSES, Task, TaskStatus, User
from helix_api.tasks.rules import Rules

logger = logging.getLogger(__name__)

_USERS, _TASKS = User.__table__, Task.__table__
# What a caller passes for a limit it leaves as it is (None means "back to the operator's default").
KEEP: Any = object()


class UserNotFound(NotFound):
    """No such user."""


@dataclass(frozen=True)
class UserLimits:
    """One user's limits: their overrides, the operator's defaults, what holds, and where they stand now."""

    user: str
    max_queued: int | None  # own override: None = the default, 0 = no limit
    max_running: int | None
    default_queued: int  # the operator's settings (0 = no limit)
    default_running: int
    queued: int  # tasks waiting now
    running: int  # tasks claimed or running now

    @property
    def effective_queued(self) -> int | None:
        """The queued-task limit that holds (None: no limit)."""
        return _effective(self.max_queued, self.default_queued)

    @property
    def effective_running(self) -> int | None:
        """The running-task limit that holds (None: no limit)."""
        return _effective(self.max_running, self.default_running)

    def to_json(self) -> dict[str, Any]:
        """As the admin API shows it."""
        return {"user": self.user, "max_queued": self.max_queued, "max_running": self.max_running,
                "defaults": {"max_queued": self.default_queued, "max_running": self.default_running},
                "effective": {"max_queued": self.effective_queued, "max_running": self.effective_running},
                "queued": self.queued, "running": self.running}


def _effective(own: int | None, default: int) -> int | None:
    # The same rule as the SQL that enforces it: the user's value, else the default; 0 (or less) is none.
    limit = default if own is None else own
    return limit if limit > 0 else None


def read(database: Database, name: str, rules: Rules) -> UserLimits:
    """User `name`'s limits (`rules`: the operator's defaults) and how many tasks they have queued and
    running; UserNotFound if there is no such user."""
    with database.connect() as conn:
        return _read(conn, name, rules)


def change(database: Database, name: str, rules: Rules, *, max_queued: int | None = KEEP,
           max_running: int | None = KEEP) -> UserLimits:
    """Set user `name`'s overrides (None: back to the operator's default; KEEP: unchanged) and return their
    limits as they now are; UserNotFound if there is no such user.

    Negative values are the caller's to refuse (the API's schema, the CLI's option type): the SQL reads
    any value at or below 0 as "no limit", which is never what a negative number meant.
    """
    values = {column: value for column, value in (("max_queued", max_queued), ("max_running", max_running))
              if value is not KEEP}
    if any(value is not None and value < 0 for value in values.values()):
        raise ValueError(f"a limit cannot be negative: {values}")
    with database.transaction() as conn:
        if values and not conn.execute(update(_USERS).where(_USERS.c.name == name).values(**values)).rowcount:
            raise UserNotFound(f"There is no user called {name!r}.")
        limits = _read(conn, name, rules)
    if values:
        logger.info("limits of user %s set: %s", name, values)
    return limits


def _read(conn: Connection, name: str, rules: Rules) -> UserLimits:
    row = conn.execute(select(_USERS.c.id, _USERS.c.name, _USERS.c.max_queued, _USERS.c.max_running)
                       .where(_USERS.c.name == name)).one_or_none()
    if row is None:
        raise UserNotFound(f"There is no user called {name!r}.")
    counts = dict(conn.execute(select(_TASKS.c.status, func.count())
                               .where(_TASKS.c.user_id == row.id,
                                      _TASKS.c.status.in_([TaskStatus.QUEUED, *ACTIVE_TASK_STATUSES]))
                               .group_by(_TASKS.c.status)).all())
    return UserLimits(user=row.name, max_queued=row.max_queued, max_running=row.max_running,
                      default_queued=rules.max_queued_per_user, default_running=rules.max_running_per_user,
                      queued=counts.get(TaskStatus.QUEUED, 0),
                      running=sum(counts.get(status, 0) for status in ACTIVE_TASK_STATUSES))
