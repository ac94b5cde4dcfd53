"""The words of sessions, replies and tasks: their enums, and the named groups of statuses.

Kept free of SQLAlchemy so the `helix` command can offer the statuses without loading it;
`models.py` re-exports everything here, next to the columns that store it.
"""

from __future__ import annotations

import enum


class Mode(enum.StrEnum):
    """What a session or task does: inference (`create`), training (`finetune`), or scoring replies
    with a reward model (`score`, a task kind only: its session stays `create`)."""

    CREATE = "create"
    FINETUNE = "finetune"
    SCORE = "score"


class SessionType(enum.StrEnum):
    """What a session makes."""

    TEXT = "text"
    IMAGE = "image"


class Creator(enum.StrEnum):
    """Who wrote an interaction."""

    USER = "user"
    ASSISTANT = "assistant"


class InteractionState(enum.StrEnum):
    """The state of a reply, as its user sees it."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    ERROR = "error"
    CANCELLED = "cancelled"


class TaskStatus(enum.StrEnum):
    """The state of a task, as the scheduler sees it (see notes.md for the transitions)."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"


# The groups every module asks about, named once. Members are StrEnums, so a plain string read from
# JSON or an event ("queued") is found in them too.

# Leased to a runner: a heartbeat renews it, and an expired lease is reaped.
ACTIVE_TASK_STATUSES = frozenset({TaskStatus.CLAIMED, TaskStatus.RUNNING})
# Not finished: its session is busy, its user may cancel it, it counts in a queue's depth.
OPEN_TASK_STATUSES = frozenset({TaskStatus.QUEUED, *ACTIVE_TASK_STATUSES})
# Ended in an error: `failed` when the runner said not to retry, `dead` when the attempts ran out.
FAILED_TASK_STATUSES = frozenset({TaskStatus.FAILED, TaskStatus.DEAD})
# Finished for good: nothing changes a task in these.
FINAL_TASK_STATUSES = frozenset({TaskStatus.COMPLETE, TaskStatus.CANCELLED, *FAILED_TASK_STATUSES})

# A reply still on its way: its page follows it live.
OPEN_INTERACTION_STATES = frozenset({InteractionState.QUEUED, InteractionState.RUNNING})
# A reply that has ended, one way or another.
FINAL_INTERACTION_STATES = frozenset({InteractionState.COMPLETE, InteractionState.ERROR,
                                      InteractionState.CANCELLED})


class AttemptEnd(enum.StrEnum):
    """How one attempt at a task ended, as `task_usage.outcome` records it."""

    COMPLETE = "complete"
    FAILED = "failed"  # failed for good (retry: false)
    DEAD = "dead"  # out of attempts
    CANCELLED = "cancelled"  # by its user
    RETRIED = "retried"  # failed or its lease expired, and the task went back to the queue
    RELEASED = "released"  # its runner handed it back while stopping


# The ends that finish a task (the others send it back to the queue).
FINAL_ATTEMPT_ENDS = frozenset({AttemptEnd.COMPLETE, AttemptEnd.FAILED, AttemptEnd.DEAD, AttemptEnd.CANCELLED})
# What a user's bill counts: runner time of an attempt that failed, or was lost, is the operator's.
BILLED_ATTEMPT_ENDS = frozenset({AttemptEnd.COMPLETE, AttemptEnd.CANCELLED})

# The `response_format` types that ask for a JSON reply (OpenAI's words; params.py checks the whole shape).
JSON_RESPONSE_FORMATS = frozenset({"json_object", "json_schema"})
# The words of `tool_choice` (besides naming one function), for the API's checks and `helix chat --tool-choice`.
TOOL_CHOICES = ("none", "auto", "required")
