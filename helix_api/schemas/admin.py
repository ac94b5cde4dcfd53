"""What the admin API reads."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, with_config
from typing_extensions import TypedDict

from helix_api.schemas.base import BODY, INT32_MAX, QUERY


@with_config(QUERY)
class Overview(TypedDict, total=False):
    """GET /api/v1/admin/overview: how many recent failures to list."""

    failures: Annotated[int, Field(ge=1, le=200)]


# A limit or a count of runners: never negative, within the integer column.
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]


@with_config(BODY)
class UserLimits(TypedDict, total=False):
    """PUT /api/v1/admin/users/<name>/limits: a user's own limits (null: the operator's default; 0: no
    limit); a field left out stays as it is."""

    max_queued: Annotated[Count | None, Field(description="tasks queued at once (null: MAX_QUEUED_PER_USER)")]
    max_running: Annotated[Count | None, Field(description="tasks running at once (null: MAX_RUNNING_PER_USER)")]


@with_config(BODY)
class ReservationSet(TypedDict):
    """PUT /api/v1/admin/reservations/<model>: runners of the model's pool kept for fine-tuning (0 removes)."""

    runners: Count
