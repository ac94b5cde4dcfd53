"""The typed task row: what every transition and claim hands back, instead of an untyped SQL row."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from helix_api.models import Task
from helix_api.vocabulary import Mode, SessionType, TaskStatus

_TASKS = Task.__table__


@dataclass(frozen=True, slots=True)
class TaskRow:
    """A task as SQL holds it: one row of `tasks`, typed (see models.Task for what each column means)."""

    id: int
    session_id: int
    interaction_id: int
    user_id: int
    mode: Mode
    type: SessionType
    model_name: str
    priority: int
    status: TaskStatus
    input: dict[str, Any]
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    attempt: int
    max_attempts: int
    lease_token: str | None
    lease_expires_at: datetime | None
    adapter: str | None
    warm_until: datetime | None
    runner: str | None
    runner_token_id: int | None
    last_event_seq: int
    created_at: datetime
    queued_at: datetime
    claimed_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    cancelled_at: datetime | None

    @classmethod
    def of(cls, row: Any) -> TaskRow:
        """The typed task of a row selected or returned with every column of `tasks`, in table order."""
        return cls(*row)


# The row is built positionally, so its fields must follow the table's columns.
assert [f.name for f in fields(TaskRow)] == [c.name for c in _TASKS.c], "TaskRow must follow tasks' columns"
TASK_COLUMNS = tuple(_TASKS.c)
