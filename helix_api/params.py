"""Generation and training parameters: which a task of each mode and type takes, and their ranges.

Checked when a message is stored, so a bad value is a 400 naming the param and never reaches a GPU.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidField
from .models import Mode, SessionType

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Limits:
    """The operator's caps (HELIX_MAX_NEW_TOKENS and friends) and the params test backends may take."""

    max_new_tokens: int = 4096
    max_image_side: int = 2048
    max_steps: int = 150
    max_images: int = 4
    max_train_steps: int = 100_000
    extra: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Limits:
        """Limits from the app's settings."""
        extra = tuple(p.strip() for p in str(settings.get("EXTRA_PARAMS") or "").split(",") if p.strip())
        return cls(max_new_tokens=int(settings["MAX_NEW_TOKENS"]), max_image_side=int(settings["MAX_IMAGE_SIDE"]),
                   max_steps=int(settings["MAX_STEPS"]), max_images=int(settings["MAX_IMAGES"]),
                   max_train_steps=int(settings["MAX_TRAIN_STEPS"]), extra=extra)


def _bad(name: str, what: str, value: Any) -> InvalidField:
    shown = json.dumps(value)[:40] if not isinstance(value, str) else repr(value[:40])
    return InvalidField(f"Param {name!r} must be {what}, not {shown}.", field=f"params.{name}")


def _number(low: float | None = None, high: float | None = None, *, integer: bool = False,
            low_open: bool = False, multiple: int | None = None) -> Check:
    """A check for a number in [low, high] (or (low, high] with `low_open`)."""
    parts = ["an integer" if integer else "a number"]
    if low is not None and high is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g} and <= {high:g}")
    elif low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if multiple:
        parts.append(f"a multiple of {multiple}")
    what = ", ".join(parts)

    def check(name: str, value: Any) -> Any:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise _bad(name, what, value)
        if low is not None and (value <= low if low_open else value < low):
            raise _bad(name, what, value)
        if high is not None and value > high:
            raise _bad(name, what, value)
        if multiple and value % multiple:
            raise _bad(name, what, value)
        return value

    return check


def _boolean(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise _bad(name, "true or false", value)
    return value


def _text(max_chars: int) -> Check:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, str) or len(value) > max_chars:
            raise _bad(name, f"a string of at most {max_chars} characters", value)
        return value
    return check


def _stop(name: str, value: Any) -> Any:
    """One stop string or a list of up to 8, none empty."""
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or not 1 <= len(items) <= 8
            or not all(isinstance(s, str) and 0 < len(s) <= 200 for s in items)):
        raise _bad(name, "a non-empty string or a list of 1 to 8 of them", value)
    return value


def _any_json(name: str, value: Any) -> Any:
    return value


@functools.lru_cache(maxsize=8)
def _schemas(limits: Limits) -> dict[tuple[Mode, SessionType], dict[str, Check]]:
    seed = _number(0, 2**63 - 1, integer=True)
    side = _number(64, limits.max_image_side, integer=True, multiple=8)
    training = {
        "max_steps": _number(1, limits.max_train_steps, integer=True),
        "learning_rate": _number(0, 1, low_open=True),
        "lora_r": _number(1, 1024, integer=True),
        "seed": seed,
    }
    return {
        (Mode.CREATE, SessionType.TEXT): {
            "max_new_tokens": _number(1, limits.max_new_tokens, integer=True),
            "temperature": _number(0, 100),
            "top_p": _number(0, 1, low_open=True),
            "top_k": _number(0, 1_000_000, integer=True),
            "do_sample": _boolean,
            "seed": seed,
            "repetition_penalty": _number(0, 100, low_open=True),
            "stop": _stop,
        },
        (Mode.CREATE, SessionType.IMAGE): {
            "negative_prompt": _text(2000),
            "width": side,
            "height": side,
            "num_inference_steps": _number(1, limits.max_steps, integer=True),
            "guidance_scale": _number(0, 100),
            "seed": seed,
            "num_images": _number(1, limits.max_images, integer=True),
        },
        (Mode.FINETUNE, SessionType.TEXT): {
            **training,
            "num_epochs": _number(1, 1000, integer=True),
            "lora_alpha": _number(1, 4096, integer=True),
        },
        (Mode.FINETUNE, SessionType.IMAGE): {
            **training,
            "resolution": side,
        },
    }


def check_params(params: dict[str, Any], mode: Mode, type_: SessionType, limits: Limits) -> dict[str, Any]:
    """`params` unchanged when every name is known for this kind of task and every value in range."""
    schema = _schemas(limits)[(mode, type_)]
    for name, value in params.items():
        check = schema.get(name) or (_any_json if name in limits.extra else None)
        if check is None:
            raise InvalidField(f"Unknown param {name!r} for a {type_.value} {mode.value} task; allowed: "
                               f"{', '.join(sorted(schema))}.", field=f"params.{name}")
        if value is not None:
            check(name, value)
    return params
