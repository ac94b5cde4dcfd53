"""What the usage API reads: a time range, a grouping and, for admins, whose usage."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, with_config
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from helix_api.errors import echo
from helix_api.schemas.base import QUERY, text


def instant(value: str) -> datetime:
    """A date (its midnight, UTC) or an ISO 8601 time (UTC unless it names its offset)."""
    raw = value.strip()
    try:
        if len(raw) == 10:
            return datetime.combine(date.fromisoformat(raw), time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise PydanticCustomError(
            "instant", "must be a date (2026-12-01) or an ISO 8601 time (2026-12-01T10:00:00Z), not {value}",
            {"value": echo(raw)}) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


Instant = Annotated[text(40), AfterValidator(instant),
                    Field(description="a date (UTC midnight) or an ISO 8601 time; UTC unless it says otherwise")]

# `from` is a Python keyword: the functional form names it.
UsageQuery = with_config(QUERY)(TypedDict("UsageQuery", {
    "from": Annotated[Instant, Field(description="from this time on (inclusive)")],
    "to": Annotated[Instant, Field(description="up to this time (exclusive)")],
    "group_by": Literal["model", "day"],
    "user": Annotated[text(100), Field(description="whose usage (admins only; others may name themselves)")],
}, total=False))
UsageQuery.__doc__ = "GET /api/v1/usage: whose usage, over which time, grouped per model or per UTC day."
