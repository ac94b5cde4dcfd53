"""Reading request input: JSON bodies, query strings and event cursors, with 400s that name the field at fault."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from flask import request

from .errors import BadRequest, InvalidField, UnknownMode, UnknownType
from .feed import Cursor
from .models import Mode, SessionType

# `inference` is what people call it; `create` is the word the runner URL has always used.
_MODES = {"create": Mode.CREATE, "inference": Mode.CREATE, "finetune": Mode.FINETUNE}
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "an object", list: "an array"}


def json_body(allowed: Iterable[str]) -> dict[str, Any]:
    """The request's JSON object, refusing malformed JSON and fields not in `allowed`."""
    raw = request.get_data(cache=True)
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, not {type(body).__name__}.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidField(f"Unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}.",
                           field=unknown[0])
    return body


def field(body: dict[str, Any], name: str, kind: type, *, required: bool = True, default: Any = None) -> Any:
    """`body[name]`, checked to be of `kind`."""
    if name not in body or body[name] is None:
        if required:
            raise InvalidField(f"Field {name!r} is required.", field=name)
        return default
    value = body[name]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise InvalidField(f"Field {name!r} must be {_TYPE_NAMES.get(kind, kind.__name__)}, "
                           f"not {json.dumps(value)[:40]}.", field=name)
    return value


def parse_mode(value: Any, name: str = "mode") -> Mode:
    """A mode from `create`/`inference`/`finetune`, any case."""
    mode = _MODES.get(value.lower()) if isinstance(value, str) else None
    if mode is None:
        raise UnknownMode(f"Unknown mode {value!r}; allowed: create (or inference), finetune.", field=name)
    return mode


def parse_type(value: Any, name: str = "type") -> SessionType:
    """A type from `text`/`image`, any case."""
    try:
        return SessionType(value.lower())
    except (AttributeError, ValueError):
        raise UnknownType(f"Unknown type {value!r}; allowed: text, image.", field=name) from None


def query_number(name: str, default: float, low: float, high: float) -> float:
    """A numeric query parameter within [low, high]."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidField(f"Query parameter {name!r} must be a number, not {raw!r}.", field=name) from None
    if not low <= value <= high:
        raise InvalidField(f"Query parameter {name!r} must be between {low:g} and {high:g}.", field=name)
    return value


def allow_uploads(limit: int) -> None:
    """Let this request's body be as big as training data may be (`limit`: MAX_UPLOAD_BYTES), not a JSON body's.

    Call it before anything reads the body: form parsing and the CSRF check both do.
    """
    request.max_content_length = limit


def event_cursor() -> tuple[Cursor, bool]:
    """Where an event stream resumes (Last-Event-ID, else `?after=`, else 0) and whether it `follow`s."""
    raw_after = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
    try:
        cursor = Cursor.parse(raw_after)
    except ValueError:
        raise InvalidField(f"Last-Event-ID must be an event id (N or N.K, whole numbers), not {raw_after[:40]!r}.",
                           field="Last-Event-ID") from None
    follow = request.args.get("follow", "1").lower() not in {"0", "false", "no"}
    return cursor, follow
