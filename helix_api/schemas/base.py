"""What every request schema is made of, and the one way a refused request becomes a 400 naming the field.

The schemas are pydantic v2 TypedDicts: validating one gives back plain dicts and lists, so the code
behind the views keeps working on what it always had, and a TypeAdapter built once per schema parses
raw bytes in Rust (the worker endpoints are called hundreds of times a second).

What no schema lets through, because PostgreSQL or a client cannot read it back:
- NaN and infinities (PostgreSQL's JSON refuses them; a runner would get them as numbers);
- NUL (PostgreSQL's text cannot hold it) and lone surrogates (not encodable as UTF-8);
- integers beyond their column (ids are 32-bit, JSON numbers stay within 64 bits);
- strings beyond their column's length, and JSON nested deeper than MAX_DEPTH.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from helix_api.errors import BadRequest, InvalidField, echo

INT32_MAX = 2**31 - 1  # every id column and event seq
INT64_MAX = 2**63 - 1
MAX_DEPTH = 32  # nesting of free-form JSON (a result, a param an operator lets through)
MAX_TEXT = 1_000_000  # messages, outputs and errors live in TEXT columns; a body has its own byte limit

# JSON bodies: types as sent (no "1" for 1), unknown fields refused by name, finite numbers only.
BODY = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
# Runners' events: as BODY, but what a backend adds is typed by the schema's `extra_items`.
EVENT = ConfigDict(strict=True, allow_inf_nan=False)
# Query strings and form fields arrive as text: numbers are parsed from it, unknown names ignored.
QUERY = ConfigDict(strict=False, extra="ignore", allow_inf_nan=False)


def text(max_length: int = MAX_TEXT, min_length: int = 0) -> Any:
    """A string type of at most `max_length` characters (its column's).

    NUL is refused for every string at once, before validation (see `_nul_refusal`): a check per string
    would cost the worker endpoints dearly. A lone surrogate never gets this far: the JSON parser
    refuses its escape, and werkzeug decodes forms, query strings and headers with replacement characters.
    """
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length)]


def json_problem(value: Any, depth: int = 0, at: str = "") -> tuple[str, str] | None:
    """Where in `value` and what makes it unfit to store as JSON (NaN, NUL, an integer beyond 64 bits,
    nesting deeper than MAX_DEPTH), or None when it is fit: `(".a[2]", "NaN or an infinity")`."""
    if isinstance(value, str):
        if "\x00" in value:
            return at, "a string with NUL (\\u0000)"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return at, "a string with a lone surrogate"
        return None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if -INT64_MAX - 1 <= value <= INT64_MAX else (at, "an integer beyond 64 bits")
    if isinstance(value, float):
        return None if math.isfinite(value) else (at, "NaN or an infinity")
    if depth >= MAX_DEPTH:
        return at, f"JSON nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{at}.{key}"
            if not isinstance(key, str):
                return where, "a key that is not a string"
            problem = json_problem(key, depth + 1, where) or json_problem(item, depth + 1, where)
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = json_problem(item, depth + 1, f"{at}[{index}]")
            if problem:
                return problem
        return None
    return at, f"not JSON ({type(value).__name__})"


def _checked_json(value: Any) -> Any:
    problem = json_problem(value)
    if problem:
        raise PydanticCustomError("unsafe_json", "holds {problem}", {"problem": problem[1], "at": problem[0]})
    return value


# Free-form JSON (a runner's result, an operator's extra params): anything JSON, but storable.
JsonValue = Annotated[Any, AfterValidator(_checked_json)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_checked_json)]
Id = Annotated[int, Field(ge=1, le=INT32_MAX)]
Seq = Annotated[int, Field(ge=1, le=INT32_MAX)]
Cursor = Annotated[int, Field(ge=0, le=INT32_MAX)]

_TYPE_WORDS = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
               "bool_type": "a boolean", "dict_type": "an object", "model_type": "an object",
               "list_type": "an array", "int_parsing": "an integer", "float_parsing": "a number",
               "bool_parsing": "true or false", "literal_error": None, "enum": None}
# Parts of a pydantic error location that name a union member or a validator, not a field; and the tags
# of discriminated unions (an event's kind), which schemas register with `union_tags`.
_NOT_A_FIELD = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|function-.*|.*\[.*\]|.*-.*)$")
_TAGS: set[str] = set()


def union_tags(*tags: str) -> None:
    """Say that `tags` name members of a discriminated union, so error paths leave them out."""
    _TAGS.update(tags)


def path_of(loc: tuple[Any, ...], prefix: str = "") -> str:
    """`('messages', 0, 'role')` as `messages[0].role`, the way our errors name fields."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TAGS and not _NOT_A_FIELD.match(str(part)):
            out += f".{part}" if out else str(part)
    return out


def message_of(error: Mapping[str, Any], name: str, *, allowed: Any = None, what: str = "Field") -> str:
    """A pydantic error as one sentence naming the field."""
    kind = error["type"]
    if kind == "missing":
        return f"{what} {name!r} is required."
    if kind == "extra_forbidden":
        tail = f"; allowed: {', '.join(sorted(allowed))}" if allowed else ""
        return f"Unknown field {echo(name.rsplit('.', 1)[-1])}{tail}."
    word = _TYPE_WORDS.get(kind)
    if word:
        return f"{what} {name!r} must be {word}, not {echo(error.get('input'))}."
    if kind == "unsafe_json":
        return f"{what} {name!r} is {error['ctx']['problem']}, which cannot be stored."
    return f"{what} {name!r}: {error['msg'][0].lower()}{error['msg'][1:]}."


def refusal(err: ValidationError, *, allowed: Any = None) -> BadRequest:
    """The 400 for the first thing wrong in a request: malformed JSON, or the field at fault."""
    error = err.errors(include_url=False, include_input=True)[0]
    if error["type"] == "json_invalid":
        return BadRequest(f"The request body is not valid JSON: {error['ctx']['error']}.")
    ctx = error.get("ctx") or {}
    name = path_of(error["loc"]) + ctx.get("at", "")
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # the field that picks the member
        name += "." + str(ctx.get("discriminator", "")).strip("'")
    if not name:
        return BadRequest(f"The request body must be a JSON object, not {echo(error.get('input'))}.")
    top = allowed if len(error["loc"]) == 1 else None
    return InvalidField(message_of(error, name, allowed=top), field=name)


def adapter(schema: Any) -> TypeAdapter:
    """A TypeAdapter for `schema`, built once where the schema is defined (building one is slow)."""
    return TypeAdapter(schema)


def fields_of(schema: Any) -> frozenset[str]:
    """The field names a TypedDict schema declares."""
    return frozenset(schema.__required_keys__ | schema.__optional_keys__)


def _nul_refusal(value: Any) -> InvalidField | None:
    problem = json_problem(value)
    if problem is None:
        return None
    name = problem[0].lstrip(".") or "body"
    return InvalidField(f"Field {name!r} is {problem[1]}, which cannot be stored.", field=name)


def validate_json(schema_adapter: TypeAdapter, raw: bytes, allowed: Any = None) -> Any:
    """Raw JSON bytes validated by `schema_adapter`; a 400 naming the field otherwise."""
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        value = schema_adapter.validate_json(raw)
    except ValidationError as err:
        raise refusal(err, allowed=allowed) from None
    # JSON can carry NUL only as the escape \u0000: one scan of the bytes spares a check per string.
    if b"\\u0000" in raw:
        refused = _nul_refusal(value)
        if refused:
            raise refused
    return value


def validate(schema_adapter: TypeAdapter, value: Mapping[str, Any], allowed: Any = None) -> Any:
    """Text values (a query string, a form, headers) validated by `schema_adapter`; a 400 naming the field."""
    try:
        checked = schema_adapter.validate_python(value)
    except ValidationError as err:
        raise refusal(err, allowed=allowed) from None
    if any("\x00" in item for item in value.values() if isinstance(item, str)):
        refused = _nul_refusal(dict(value))
        if refused:
            raise refused
    return checked
