"""The operator's settings of the fleet's scheduling rules: warm routing, fair shares, ageing, per-user limits.

What each rule does is the claim rule's (claims.py) and the enqueue's (transitions.py); this is only
how strongly, read once from the settings.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any


@dataclass(frozen=True)
class Rules:
    """The operator's settings of the scheduling rules (each off at 0)."""

    warm_wait_seconds: float = 1.0
    fair_share: bool = True
    ageing_seconds: float = 30.0
    max_queued_per_user: int = 10_000
    max_running_per_user: int = 0

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Rules:
        """The rules the WARM_WAIT_SECONDS, FAIR_SHARE, AGEING_SECONDS and MAX_*_PER_USER settings describe."""
        return cls(warm_wait_seconds=float(settings["WARM_WAIT_SECONDS"]), fair_share=bool(settings["FAIR_SHARE"]),
                   ageing_seconds=float(settings["AGEING_SECONDS"]),
                   max_queued_per_user=int(settings["MAX_QUEUED_PER_USER"]),
                   max_running_per_user=int(settings["MAX_RUNNING_PER_USER"]))

    def warm_until(self, now: datetime) -> datetime | None:
        """Until when a task whose adapter is warm somewhere waits for that runner: jittered, so that
        tasks queued together do not all fall back to cold runners at once."""
        if self.warm_wait_seconds <= 0:
            return None
        return now + timedelta(seconds=self.warm_wait_seconds * random.uniform(1.0, 2.0))
