"""A task's params read at a backend's boundary: a value that cannot be used is `BadTaskInput` naming it.

The API range-checks params before a task is stored, but a backend still converts what it is given,
and a conversion that fails must fail the task once (no retry), not surface later as a ValueError deep
inside a model library that looks like a crash. Absent and `null` params take the default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from runner.errors import BadTaskInput


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def bad_param(name: str, what: str, value: Any) -> BadTaskInput:
    """The error for param `name` holding `value` where `what` was wanted."""
    return BadTaskInput(f"param {name!r} must be {what}, not {_shown(value)}")


def _converted(name: str, what: str, value: Any, convert: Callable[[Any], Any]) -> Any:
    """`convert(value)` for a number or its digits; a bool, any other type or unreadable text is a bad param."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise bad_param(name, what, value)
    try:
        return convert(value)
    except ValueError:
        raise bad_param(name, what, value) from None


def integer(params: Mapping[str, Any], name: str, default: int, *, low: int | None = None,
            multiple: int | None = None) -> int:
    """Param `name` as an int (an integral number or its digits), at least `low`, a multiple of `multiple`."""
    what = "an integer" + (f" >= {low}" if low is not None else "")
    what += f", a multiple of {multiple}" if multiple else ""
    value = params.get(name)
    if value is None:
        return default
    number = _converted(name, what, value, lambda v: float(v) if isinstance(v, float) else int(v))
    if isinstance(number, float):
        if not number.is_integer():
            raise bad_param(name, what, value)
        number = int(number)
    if (low is not None and number < low) or (multiple and number % multiple):
        raise bad_param(name, what, value)
    return number


def number(params: Mapping[str, Any], name: str, default: float, *, low: float | None = None,
           above: float | None = None) -> float:
    """Param `name` as a finite float, at least `low` or greater than `above`."""
    what = "a number" + (f" >= {low:g}" if low is not None else "") + (f" > {above:g}" if above is not None else "")
    value = params.get(name)
    if value is None:
        return default
    converted = _converted(name, what, value, float)
    if not math.isfinite(converted) or (low is not None and converted < low) or (
            above is not None and converted <= above):
        raise bad_param(name, what, value)
    return converted


def flag(params: Mapping[str, Any], name: str, default: bool) -> bool:
    """Param `name` as true or false (JSON booleans only: the string "false" is not false)."""
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_param(name, "true or false", value)
    return value


def text(params: Mapping[str, Any], name: str) -> str | None:
    """Param `name` as a string; None when absent or empty."""
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_param(name, "a string", value)
    return value or None


def strings(params: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """Param `name` as strings: one string or a list of them (empty ones dropped)."""
    value = params.get(name)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise bad_param(name, "a string or a list of strings", value)
    return tuple(item for item in items if item)
