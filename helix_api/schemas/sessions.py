"""What the session API reads: bodies that start and continue sessions, and its query strings and headers."""

from __future__ import annotations

from typing import Annotated, Required

from pydantic import Field, with_config
from typing_extensions import TypedDict

from helix_api.schemas.base import BODY, QUERY, Id, JsonObject, text

Mode = Annotated[text(32), Field(description="create (or inference), finetune; any case")]
Type = Annotated[text(32), Field(description="text or image; any case")]
ModelName = text(500, min_length=1)
# An event id (feed.Cursor): a row number within an id column, then optionally a text offset; ASCII digits.
EVENT_ID = r"^[0-9]{1,10}(\.[0-9]{1,18})?$"  # sessions.model_name is VARCHAR(500)


@with_config(BODY)
class SessionCreate(TypedDict, total=False):
    """POST /api/v1/sessions (JSON): a session with its first message."""

    mode: Mode | None
    type: Type | None
    model_name: Required[ModelName]
    message: Required[text()]
    params: Annotated[JsonObject | None, Field(description="the params of this kind of task (see Params*)")]
    name: text(200) | None
    knowledge: Annotated[list[Id] | None, Field(max_length=16, description=(
        "ids of the caller's knowledge bases that every turn retrieves from (text sessions)"))]


@with_config(QUERY)
class FinetuneForm(TypedDict, total=False):
    """POST /api/v1/sessions (multipart): a fine-tune; `files` are the training data, `params` JSON text."""

    mode: Mode
    type: Type
    model_name: text(500)
    message: text()
    params: Annotated[text(100_000), Field(description="a JSON object of training params")]
    name: text(200)


@with_config(BODY)
class SessionMessage(TypedDict, total=False):
    """POST /api/v1/sessions/<id>/messages: continue a session."""

    message: Required[text()]
    params: JsonObject | None


@with_config(QUERY)
class SessionPage(TypedDict, total=False):
    """GET /api/v1/sessions: a page of sessions, newest first."""

    limit: Annotated[int, Field(ge=1, le=1000)]
    before: Id


@with_config(QUERY)
class EventCursor(TypedDict, total=False):
    """GET /api/v1/sessions/<id>/events: resume after an event id (`Last-Event-ID` header, else `after`)."""

    after: Annotated[text(40), Field(pattern=EVENT_ID, description="an event id: N, or N.K inside a reply's text")]
    follow: text(8)


@with_config(BODY)
class ScoreRequest(TypedDict, total=False):
    """POST /api/v1/sessions/<id>/score: candidate replies to a prompt, scored by a reward-model fine-tune."""

    prompt: Required[text()]
    candidates: Required[Annotated[list[text()], Field(description="the replies to score, 1 to MAX_SCORE_CANDIDATES")]]
