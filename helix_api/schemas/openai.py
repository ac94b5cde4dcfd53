"""What the OpenAI-compatible API reads: chat completions and image generations, field by field.

Types and sizes are checked here; what Helix does with a value (its range as a param, which roles
and neutral values it takes) is checked by the views, so their errors keep naming OpenAI's fields.
"""

from __future__ import annotations

from typing import Annotated, Required

from pydantic import Field, with_config
from typing_extensions import TypedDict

from helix_api.schemas.base import BODY, INT64_MAX, QUERY, Id, JsonObject, JsonValue, text

Int = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
Number = Annotated[float, Field(allow_inf_nan=False)]
Model = text(500, min_length=1)


@with_config({**BODY, "extra": "allow"})
class ChatMessage(TypedDict, total=False):
    """One message; other keys (refusal, audio, ...) are taken only when null or empty."""

    role: Required[text(32)]
    content: text() | list[JsonObject] | None
    name: text(200) | None
    tool_calls: Annotated[list[JsonObject], Field(max_length=128)] | None
    tool_call_id: text(200) | None


@with_config(BODY)
class StreamOptions(TypedDict, total=False):
    """`stream_options`, with `stream: true` only."""

    include_usage: bool | None


@with_config(BODY)
class ChatCompletion(TypedDict, total=False):
    """POST /v1/chat/completions."""

    model: Required[Model]
    messages: Required[Annotated[list[ChatMessage], Field(max_length=10_000)]]
    stream: bool | None
    stream_options: StreamOptions | None
    max_tokens: Int | None
    max_completion_tokens: Int | None
    temperature: Number | None
    top_p: Number | None
    stop: text(200) | Annotated[list[text(200)], Field(max_length=64)] | None
    seed: Int | None
    top_k: Int | None
    repetition_penalty: Number | None
    n: Int | None
    frequency_penalty: Number | None
    presence_penalty: Number | None
    logprobs: bool | None
    top_logprobs: Int | None
    logit_bias: JsonObject | None
    tools: list[JsonValue] | None
    functions: list[JsonValue] | None
    tool_choice: JsonValue
    function_call: JsonValue
    parallel_tool_calls: bool | None
    response_format: JsonObject | None
    modalities: list[text(32)] | None
    service_tier: text(32) | None
    user: text(500) | None
    store: bool | None
    metadata: JsonObject | None
    knowledge: Annotated[list[Id] | None, Field(max_length=16, description=(
        "Helix's own: ids of the caller's knowledge bases to retrieve from; the answer lists its `sources`"))]


@with_config(BODY)
class ImageGeneration(TypedDict, total=False):
    """POST /v1/images/generations."""

    prompt: Required[text()]
    model: Model | None
    n: Int | None
    size: text(32) | None
    response_format: text(16) | None
    quality: text(32) | None
    style: text(32) | None
    seed: Int | None
    negative_prompt: text(2000) | None
    num_inference_steps: Int | None
    guidance_scale: Number | None
    user: text(500) | None


@with_config(QUERY)
class FileLink(TypedDict, total=False):
    """GET /v1/files/<id>/content: the signed token of an image link."""

    token: text(1000)
