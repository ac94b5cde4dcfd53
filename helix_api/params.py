"""Generation and training parameters: which a task of each mode and type takes, and their ranges.

Each kind of task has a pydantic schema (built once per set of operator limits); a field's description
says what it takes and is both its OpenAPI description and the words of the 400 that names it.
Checked when a message is stored, so a bad value is a 400 naming the param and never reaches a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

from helix_api import constraints
from helix_api.errors import InvalidField, echo
from helix_api.models import Mode, SessionType
from helix_api.schemas.base import INT64_MAX, json_problem
from helix_api.vocabulary import TOOL_CHOICES


@dataclass(frozen=True)
class Limits:
    """The operator's caps (HELIX_MAX_NEW_TOKENS and friends) and the params test backends may take."""

    max_new_tokens: int = 4096
    max_image_side: int = 2048
    max_steps: int = 150
    max_images: int = 4
    max_train_steps: int = 100_000
    max_schema_bytes: int = 65536
    max_schema_depth: int = 32
    extra: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Limits:
        """Limits from the app's settings."""
        extra = tuple(p.strip() for p in str(settings.get("EXTRA_PARAMS") or "").split(",") if p.strip())
        return cls(max_new_tokens=int(settings["MAX_NEW_TOKENS"]), max_image_side=int(settings["MAX_IMAGE_SIDE"]),
                   max_steps=int(settings["MAX_STEPS"]), max_images=int(settings["MAX_IMAGES"]),
                   max_train_steps=int(settings["MAX_TRAIN_STEPS"]),
                   max_schema_bytes=int(settings["MAX_SCHEMA_BYTES"]),
                   max_schema_depth=int(settings["MAX_SCHEMA_DEPTH"]), extra=extra)


def _number(low: float | None = None, high: float | None = None, *, integer: bool = False,
            low_open: bool = False, multiple: int | None = None) -> Any:
    """A number in [low, high] (or (low, high] with `low_open`), finite, as sent (no "1" for 1)."""
    parts = ["an integer" if integer else "a number"]
    if low is not None and high is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g} and <= {high:g}")
    elif low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if multiple:
        parts.append(f"a multiple of {multiple}")
    bounds = {"gt" if low_open else "ge": low, "le": high, "multiple_of": multiple}
    kind = int if integer else float
    return Annotated[kind, Field(description=", ".join(parts), strict=True, allow_inf_nan=False,
                                 **{k: v for k, v in bounds.items() if v is not None})]


_Stop = Annotated[str, StringConstraints(min_length=1, max_length=200)]
_STOP = Annotated[_Stop | Annotated[list[_Stop], Field(min_length=1, max_length=8)],
                  Field(description="a non-empty string or a list of 1 to 8 of them")]
_BOOLEAN = Annotated[bool, Field(description="true or false", strict=True)]
_NEGATIVE = Annotated[str, Field(description="a string of at most 2000 characters", strict=True, max_length=2000)]
# Structured output and tool calls, in OpenAI's shapes: their types here, the rest in constraints.py.
_RESPONSE_FORMAT = Annotated[dict[str, Any], Field(description=(
    'an object: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
    '{"name", "schema", "strict"?, "description"?}}'), strict=True)]
_TOOLS = Annotated[list[dict[str, Any]], Field(description=(
    'a list of {"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}'),
    strict=True)]
_TOOL_CHOICE = Annotated[Literal[TOOL_CHOICES] | dict[str, Any], Field(description=(
    'none, auto, required or {"type": "function", "function": {"name": ...}}'))]


# How a text fine-tune trains: supervised on chats (the default), DPO on comparisons, or a reward model
# (a scoring head) on comparisons, which then scores replies (POST /api/v1/sessions/<id>/score).
SFT, DPO, REWARD_MODEL = "sft", "dpo", "reward_model"
METHODS = (SFT, DPO, REWARD_MODEL)
COMPARISON_METHODS = frozenset({DPO, REWARD_MODEL})
_METHOD = Annotated[Literal[METHODS], Field(description=f"one of {', '.join(METHODS)}")]


def training_method(params: dict[str, Any]) -> str:
    """A text fine-tune's method (checked params): `sft` unless `method` says otherwise."""
    return params.get("method") or SFT


def _schema(name: str, fields: dict[str, Any]) -> Any:
    return with_config({"extra": "forbid", "strict": True})(TypedDict(name, fields, total=False))


@functools.lru_cache(maxsize=8)
def schemas(limits: Limits) -> dict[tuple[Mode, SessionType], Any]:
    """The params schema of each kind of task under `limits` (a TypedDict per kind, for OpenAPI too)."""
    seed = _number(0, INT64_MAX, integer=True)
    side = _number(64, limits.max_image_side, integer=True, multiple=8)
    training = {
        "max_steps": _number(1, limits.max_train_steps, integer=True),
        "learning_rate": _number(0, 1, low_open=True),
        "lora_r": _number(1, 1024, integer=True),
        "seed": seed,
    }
    return {
        (Mode.CREATE, SessionType.TEXT): _schema("ParamsTextCreate", {
            "max_new_tokens": _number(1, limits.max_new_tokens, integer=True),
            "temperature": _number(0, 100),
            "top_p": _number(0, 1, low_open=True),
            "top_k": _number(0, 1_000_000, integer=True),
            "do_sample": _BOOLEAN,
            "seed": seed,
            "repetition_penalty": _number(0, 100, low_open=True),
            "stop": _STOP,
            "response_format": _RESPONSE_FORMAT,
            "tools": _TOOLS,
            "tool_choice": _TOOL_CHOICE,
            "parallel_tool_calls": _BOOLEAN,
            "logprobs": _BOOLEAN,
            "top_logprobs": _number(0, constraints.MAX_TOP_LOGPROBS, integer=True),
        }),
        (Mode.CREATE, SessionType.IMAGE): _schema("ParamsImageCreate", {
            "negative_prompt": _NEGATIVE,
            "width": side,
            "height": side,
            "num_inference_steps": _number(1, limits.max_steps, integer=True),
            "guidance_scale": _number(0, 100),
            "seed": seed,
            "num_images": _number(1, limits.max_images, integer=True),
        }),
        (Mode.FINETUNE, SessionType.TEXT): _schema("ParamsTextFinetune", {
            **training,
            "num_epochs": _number(1, 1000, integer=True),
            "lora_alpha": _number(1, 4096, integer=True),
            "method": _METHOD,
            "beta": _number(0, 10, low_open=True),  # DPO's KL weight (TRL's default 0.1)
            "sft_weight": _number(0, 10),  # DPO: weight of the chosen replies' likelihood beside it (0: none)
        }),
        (Mode.FINETUNE, SessionType.IMAGE): _schema("ParamsImageFinetune", {
            **training,
            "resolution": side,
        }),
    }


# What a runner uses for a param that a create task leaves out (runner/backends: text_generation's
# SamplingParams, sdxl's DEFAULT_*; tests/api/test_params.py holds them equal). The web app shows a
# message's params against these. A seed, an image's size and stop strings have no fixed default (a
# random seed, the model's native size, none), so a message that gives one always shows it.
DEFAULTS: dict[SessionType, dict[str, Any]] = {
    SessionType.TEXT: {"max_new_tokens": 256, "do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                       "repetition_penalty": 1.0},
    SessionType.IMAGE: {"num_inference_steps": 30, "guidance_scale": 5.0, "num_images": 1, "negative_prompt": ""},
}


def not_default(params: dict[str, Any], type_: SessionType | str) -> dict[str, Any]:
    """The params that differ from the create defaults of `type_` (training params have none: all kept)."""
    defaults = DEFAULTS.get(SessionType(type_), {})
    return {name: value for name, value in params.items() if name not in defaults or value != defaults[name]}


@functools.lru_cache(maxsize=32)
def _adapter(schema: Any) -> TypeAdapter:
    return TypeAdapter(schema)


def _bad(name: str, what: str, value: Any) -> InvalidField:
    return InvalidField(f"Param {name!r} must be {what}, not {echo(value)}.", field=f"params.{name}")


def check_params(params: dict[str, Any], mode: Mode, type_: SessionType, limits: Limits) -> dict[str, Any]:
    """`params` unchanged when every name is known for this kind of task and every value in range."""
    schema = schemas(limits)[(mode, type_)]
    known = schema.__optional_keys__
    checked: dict[str, Any] = {}
    for name, value in params.items():
        if name in limits.extra:
            problem = json_problem(value)
            if problem:
                raise InvalidField(f"Param {name!r} holds {problem[1]}, which cannot be stored.",
                                   field=f"params.{name}")
        elif name not in known:
            raise InvalidField(f"Unknown param {echo(name)} for a {type_.value} {mode.value} task; allowed: "
                               f"{', '.join(sorted(known))}.", field=f"params.{name[:200]}")
        elif value is not None:
            problem = json_problem(value)  # NaN is refused below too; NUL and the like only here
            if problem:
                raise InvalidField(f"Param {name!r} holds {problem[1]}, which cannot be stored.",
                                   field=f"params.{name}")
            checked[name] = value
    try:
        _adapter(schema).validate_python(checked)
    except ValidationError as err:
        name = str(err.errors(include_url=False)[0]["loc"][0])
        what = schema.__annotations__[name].__metadata__[0].description
        raise _bad(name, what, checked[name]) from None
    if not constraints.NAMES.isdisjoint(checked):
        constraints.check(checked, max_schema_bytes=limits.max_schema_bytes, max_schema_depth=limits.max_schema_depth)
    return params
