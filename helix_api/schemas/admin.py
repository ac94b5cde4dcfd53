"""What the admin API reads."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, with_config
from typing_extensions import TypedDict

from helix_api.schemas.base import QUERY


@with_config(QUERY)
class Overview(TypedDict, total=False):
    """GET /api/v1/admin/overview: how many recent failures to list."""

    failures: Annotated[int, Field(ge=1, le=200)]
