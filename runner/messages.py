"""The small frozen messages the API hands a runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINETUNE = "finetune"  # the task mode a backend trains for (train()); every other mode predicts


@dataclass(frozen=True)
class Task:
    """One unit of GPU work, as claimed."""

    id: int
    session_id: int
    interaction_id: int
    mode: str
    type: str
    model_name: str
    attempt: int
    input: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # A zipped PEFT adapter's file ref ({id, name, sha256, size}); None means the bare base model.
    adapter: dict[str, Any] | None = None
    files: list[Any] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        """Build a Task from the claim reply's `task` object."""
        return cls(
            id=data["id"],
            session_id=data["session_id"],
            interaction_id=data["interaction_id"],
            mode=data["mode"],
            type=data["type"],
            model_name=data["model_name"],
            attempt=data["attempt"],
            input=data.get("input") or {},
            params=data.get("params") or {},
            adapter=data.get("adapter"),
            files=list(data.get("files") or []),
        )


@dataclass(frozen=True)
class Lease:
    """The right to work on one task for a while; every worker call presents its token."""

    token: str
    expires_at: str | None
    ttl_seconds: float
    heartbeat_seconds: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lease:
        """Build a Lease from the claim reply's `lease` object."""
        ttl = float(data.get("ttl_seconds") or 30)
        # Without a hint, renew three times per lease so one lost heartbeat costs nothing.
        heartbeat = float(data.get("heartbeat_seconds") or ttl / 3)
        return cls(token=data["token"], expires_at=data.get("expires_at"), ttl_seconds=ttl,
                   heartbeat_seconds=heartbeat)


@dataclass(frozen=True)
class Claim:
    """A claimed task and the lease that goes with it."""

    task: Task
    lease: Lease

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Claim:
        """Build a Claim from the 200 reply of the claim endpoint."""
        return cls(task=Task.from_json(data["task"]), lease=Lease.from_json(data["lease"]))
