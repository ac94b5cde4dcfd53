"""Reading request input through the schemas (helix_api/schemas): bodies, query strings, headers, forms.

Each helper validates what the request carries against a TypedDict schema and hands back plain values,
or raises a 400 whose `field` names what is wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from flask import request
from pydantic import TypeAdapter, ValidationError

from helix_api.errors import InvalidField, UnknownMode, UnknownType, echo
from helix_api.models import Mode, SessionType
from helix_api.schemas import base
from helix_api.schemas.sessions import EventCursor
from helix_api.streaming.feed import Cursor

# `inference` is what people call it; `create` is the word the runner URL has always used.
_MODES = {"create": Mode.CREATE, "inference": Mode.CREATE, "finetune": Mode.FINETUNE}
# Runners may also claim `score` tasks (a reward model rating replies); sessions are never in that mode.
_CLAIM_MODES = {**_MODES, "score": Mode.SCORE}
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "an object", list: "an array"}
_CURSOR_HEADER = "Last-Event-ID"


@functools.cache
def _adapter(schema: Any) -> tuple[TypeAdapter, frozenset[str]]:
    # Built once per schema: building a TypeAdapter costs far more than validating with one.
    return base.adapter(schema), base.fields_of(schema)


def json_body(schema: Any) -> dict[str, Any]:
    """The request's JSON body validated by `schema` (a TypedDict of helix_api/schemas)."""
    adapter, allowed = _adapter(schema)
    return base.validate_json(adapter, request.get_data(cache=True), allowed)


def values(schema: Any, source: Mapping[str, Any]) -> dict[str, Any]:
    """Text values (a query string, a form, headers) validated by `schema`; the last value of a repeated name."""
    adapter, allowed = _adapter(schema)
    return base.validate(adapter, dict(source.items()), allowed)


def query(schema: Any) -> dict[str, Any]:
    """The query string validated by `schema`."""
    return values(schema, request.args)


_JSON_OBJECT = base.adapter(base.JsonObject)


def json_object_text(raw: str, name: str) -> dict[str, Any]:
    """A form field's text holding a JSON object (a fine-tune's `params`), checked as a JSON body is."""
    try:
        return _JSON_OBJECT.validate_json(raw)
    except ValidationError as err:
        error = err.errors(include_url=False)[0]
        ctx = error.get("ctx") or {}
        if error["type"] == "unsafe_json":
            where = name + ctx["at"]
            raise InvalidField(f"Field {where!r} is {ctx['problem']}, which cannot be stored.", field=where) from None
        why = ctx["error"] if error["type"] == "json_invalid" else error["msg"]
        raise InvalidField(f"Field {name!r} must be a JSON object: {why}.", field=name) from None


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
                           f"not {echo(value)}.", field=name)
    return value


def parse_mode(value: Any, name: str = "mode", *, claim: bool = False) -> Mode:
    """A mode from `create`/`inference`/`finetune`, any case; with `claim` (a runner's), `score` too."""
    modes = _CLAIM_MODES if claim else _MODES
    mode = modes.get(value.lower()) if isinstance(value, str) else None
    if mode is None:
        allowed = "create (or inference), finetune" + (", score" if claim else "")
        raise UnknownMode(f"Unknown mode {echo(value)}; allowed: {allowed}.", field=name)
    return mode


def parse_type(value: Any, name: str = "type") -> SessionType:
    """A type from `text`/`image`, any case."""
    try:
        return SessionType(value.lower())
    except (AttributeError, ValueError):
        raise UnknownType(f"Unknown type {echo(value)}; allowed: text, image.", field=name) from None


def query_number(name: str, default: float, low: float, high: float) -> float:
    """A numeric query parameter within [low, high] (NaN and infinities are never within)."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidField(f"Query parameter {name!r} must be a number, not {echo(raw)}.", field=name) from None
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
    given = request.headers.get(_CURSOR_HEADER) or request.args.get("after") or "0"
    try:
        # The schema takes ASCII digits only (`²` is a digit to str.isdigit(), and `٣` to int()), and no
        # row number beyond what the column holds.
        values(EventCursor, {"after": given})
        cursor = Cursor.parse(given)
    except (InvalidField, ValueError):
        cursor = None
    if cursor is None or cursor.seq > base.INT32_MAX:
        raise InvalidField(f"{_CURSOR_HEADER} (or ?after=) must be an event id (N or N.K, whole numbers, N at "
                           f"most {base.INT32_MAX}), not {echo(given)}.", field=_CURSOR_HEADER) from None
    follow = request.args.get("follow", "1").lower() not in {"0", "false", "no"}
    return cursor, follow
