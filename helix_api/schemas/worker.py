"""What runners send: claims, heartbeats, events, results and errors, checked before anything is stored.

The worker endpoints are the hot paths, so each schema is a TypedDict whose TypeAdapter (built once)
parses the raw body in Rust and hands back plain dicts; the only Python step per event is the
check of its kind's required field and of any extra keys a backend added.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Required

from pydantic import AfterValidator, Field, with_config
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from .base import BODY, INT64_MAX, QUERY, Id, JsonObject, Seq, json_problem, text

MAX_EVENTS_PER_POST = 1000
MAX_POSTS_PER_REQUEST = 256

LeaseToken = text(64)  # tasks.lease_token is VARCHAR(64)
# An integer stays one (a step count reads back as 3, not 3.0).
Number = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)] | Annotated[float, Field(allow_inf_nan=False)]
_DECLARED = frozenset({"seq", "kind", "text", "step", "total", "message", "level"})
_NEEDS = {"token": "text", "log": "message"}


def _event_checked(event: dict[str, Any]) -> dict[str, Any]:
    needed = _NEEDS.get(event["kind"])
    if needed and needed not in event:
        raise PydanticCustomError("missing_for_kind", "a {kind} event needs '{field}'",
                                  {"kind": event["kind"], "field": needed})
    if len(event) > 3 or event["kind"] == "progress":
        for key in event.keys() - _DECLARED:  # what a backend adds, like a progress event's loss
            problem = json_problem(event[key], at=f".{key}")
            if problem:
                raise PydanticCustomError("unsafe_json", "holds {problem}", {"problem": problem[1], "at": problem[0]})
    return event


@with_config({**BODY, "extra": "allow"})
class _Event(TypedDict, total=False):
    """One event of a runner's attempt; backends may add keys (a progress event's `loss`)."""

    seq: Required[Seq]
    kind: Required[Literal["token", "progress", "log"]]
    text: text()
    step: Number | None
    total: Number | None
    message: text(100_000) | None
    level: text(16) | None


Event = Annotated[_Event, AfterValidator(_event_checked)]
Events = Annotated[list[Event], Field(max_length=MAX_EVENTS_PER_POST)]


@with_config(BODY)
class Lease(TypedDict):
    """POST .../heartbeat and .../release: the lease this runner holds."""

    lease_token: LeaseToken


@with_config(BODY)
class EventsPost(TypedDict):
    """POST /api/v1/worker/task/<id>/events: tokens, progress and log lines, each stored once by seq."""

    lease_token: LeaseToken
    events: Events


@with_config(BODY)
class TaskEvents(TypedDict):
    """One task's events in a POST /api/v1/worker/events."""

    task_id: Id
    lease_token: LeaseToken
    events: Events


@with_config(BODY)
class EventsMany(TypedDict):
    """POST /api/v1/worker/events: the events of several tasks a runner holds."""

    posts: Annotated[list[TaskEvents], Field(max_length=MAX_POSTS_PER_REQUEST)]


@with_config(BODY)
class Complete(TypedDict, total=False):
    """POST .../complete: the result (any JSON object; `text` becomes the reply) and the last events."""

    lease_token: Required[LeaseToken]
    result: Required[JsonObject]
    events: Events | None


@with_config(BODY)
class Fail(TypedDict, total=False):
    """POST .../fail: the error, and whether a retry makes sense."""

    lease_token: Required[LeaseToken]
    error: Required[text()]
    retry: bool | None


@with_config(QUERY)
class Claim(TypedDict, total=False):
    """GET /api/v1/worker/task: what this runner serves, and how long to wait for work."""

    mode: text(32)
    type: text(32)
    model_name: Required[text(500, min_length=1)]
    wait: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)]


@with_config(QUERY)
class RunnerHeaders(TypedDict, total=False):
    """Headers a runner sends: its own name, and (for files) the lease it holds."""

    runner: Annotated[text(10_000), Field(alias="X-Helix-Runner")]
    lease: Annotated[LeaseToken, Field(alias="X-Helix-Lease")]


@with_config(QUERY)
class Upload(TypedDict):
    """POST .../files (multipart, with the file in `file`): a file the task made."""

    lease_token: LeaseToken
    kind: Literal["output", "adapter"]
