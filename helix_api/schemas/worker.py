"""What runners send: claims, heartbeats, events, results and errors, checked before anything is stored.

The worker endpoints are the hot paths, so each schema is a TypedDict whose TypeAdapter (built once)
parses the raw body in Rust and hands back plain dicts, with no Python call per event unless a
backend added nested JSON to it.
"""

from __future__ import annotations

from typing import Annotated, Literal, Required

from pydantic import Field, with_config
from typing_extensions import TypedDict

from helix_api.schemas.base import BODY, EVENT, INT64_MAX, QUERY, Id, JsonObject, JsonValue, Seq, text, union_tags

MAX_EVENTS_PER_POST = 1000
MAX_POSTS_PER_REQUEST = 256
MAX_CLAIM = 64  # tasks one claim may take (`max`): a runner's free slots

LeaseToken = text(64)  # tasks.lease_token is VARCHAR(64)
# An integer stays one (a step count reads back as 3, not 3.0).
Number = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)] | Annotated[float, Field(allow_inf_nan=False)]
# What a backend may add to an event (a progress event's `loss`): numbers and text checked in Rust,
# nested JSON walked in Python (rare, so the common event costs no Python call).
Extra = Number | text(100_000) | bool | None | JsonObject | list[JsonValue]


@with_config(EVENT)
class TokenEvent(TypedDict, extra_items=Extra):
    """Text the model produced."""

    seq: Seq
    kind: Literal["token"]
    text: text()


@with_config(EVENT)
class ProgressEvent(TypedDict, total=False, extra_items=Extra):
    """A step out of a total (denoising, training), with what the backend adds."""

    seq: Required[Seq]
    kind: Required[Literal["progress"]]
    step: Number | None
    total: Number | None
    message: text(100_000) | None


@with_config(EVENT)
class LogEvent(TypedDict, total=False, extra_items=Extra):
    """A line the user may see next to the reply."""

    seq: Required[Seq]
    kind: Required[Literal["log"]]
    message: Required[text(100_000)]
    level: text(16) | None


union_tags("token", "progress", "log")
# Discriminated by kind: one dict lookup picks the schema, in Rust.
Event = Annotated[TokenEvent | ProgressEvent | LogEvent, Field(discriminator="kind")]
Events = Annotated[list[Event], Field(max_length=MAX_EVENTS_PER_POST)]


@with_config(BODY)
class Lease(TypedDict):
    """POST .../heartbeat and .../release: the lease this runner holds."""

    lease_token: LeaseToken


# A runner's report of itself (runner/profile.py): bounded so that nonsense is refused by name, not stored.
MAX_GPUS = 64  # NVML on the largest single hosts sees 16; thousands is a bug, not a machine
MAX_KINDS = 32
MAX_ADAPTERS = 256
MAX_SLOTS = 4096
Bytes = Annotated[int, Field(ge=0, le=INT64_MAX)]


@with_config(BODY)
class Gpu(TypedDict):
    """One GPU as NVML reads it: memory in bytes."""

    index: Annotated[int, Field(ge=0, lt=MAX_GPUS)]
    name: text(200)
    memory_total: Bytes
    memory_free: Bytes


@with_config(BODY)
class Cpu(TypedDict):
    """The CPU and its RAM, in bytes."""

    model: text(200)
    cores: Annotated[int, Field(ge=1, le=1 << 16)]
    memory_total: Bytes
    memory_available: Bytes


@with_config(BODY)
class Hardware(TypedDict):
    """What the machine has: its GPUs (none without NVML) and its CPU."""

    gpus: Annotated[list[Gpu], Field(max_length=MAX_GPUS)]
    cpu: Cpu


@with_config(BODY)
class Kind(TypedDict):
    """Work a runner serves: a mode, a type and a model, as a claim names them."""

    mode: Literal["create", "inference", "finetune", "score"]
    type: Literal["text", "image"]
    model_name: text(500, min_length=1)


@with_config(BODY)
class Slots(TypedDict):
    """Tasks a runner may hold at once, and how many it holds now."""

    total: Annotated[int, Field(ge=1, le=MAX_SLOTS)]
    busy: Annotated[int, Field(ge=0, le=MAX_SLOTS)]


@with_config(BODY)
class RunnerReport(TypedDict, total=False):
    """POST /api/v1/worker/runners, and a heartbeat's `runner`: what the runner is, now."""

    hardware: Required[Hardware]
    backend: Required[text(200, min_length=1)]
    kinds: Required[Annotated[list[Kind], Field(min_length=1, max_length=MAX_KINDS)]]
    slots: Required[Slots]
    adapters: Annotated[list[text(200)], Field(max_length=MAX_ADAPTERS)]
    version: Required[text(100)]


@with_config(BODY)
class Heartbeat(TypedDict, total=False):
    """POST .../heartbeat: the lease this runner holds, and (optionally) its report of itself."""

    lease_token: Required[LeaseToken]
    runner: RunnerReport


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
    # Also claim the runner's next task of the same queue, in the same transaction.
    claim_next: bool | None


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
    # One queue (the seed's URL), or several as repeated `kind=MODE:TYPE:MODEL` (checked in the view).
    model_name: text(500, min_length=1)
    kind: text(600, min_length=1)
    # Keys of the adapters the runner holds (repeated), for warm routing.
    warm: text(128, min_length=1)
    wait: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)]
    # Up to this many tasks, each with its own lease (a runner's free slots); absent: one, in the old shape.
    max: Annotated[int, Field(ge=1, le=MAX_CLAIM)]


# How many queues one poll may name, and how many adapters it may say it holds.
MAX_KINDS = 16
MAX_WARM = 64


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
