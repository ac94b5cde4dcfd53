"""Reading the web app's forms: typed params out of text fields, and errors keyed by the field at fault.

The checks that matter (ranges, models, training data) are the API's own; this only turns a form's
strings into the values the API takes, so a typo shows next to its field like any other error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from helix_api.errors import HelixError, InvalidField, echo

# A checkbox's choices: the param value each of its values stands for (an unticked box sends nothing).
JSON_REPLY = {"json_object": {"type": "json_object"}}

# Param fields each form offers, with their types (or choices); an empty field is left out (the default applies).
CHAT_PARAMS: dict[str, type | dict[str, Any]] = {"max_new_tokens": int, "temperature": float, "top_p": float,
                                                 "seed": int, "response_format": JSON_REPLY}
IMAGE_PARAMS: dict[str, type] = {"width": int, "height": int, "num_inference_steps": int, "num_images": int,
                                 "guidance_scale": float, "seed": int, "negative_prompt": str}
FINETUNE_PARAMS: dict[str, type] = {"max_steps": int, "learning_rate": float, "lora_r": int, "seed": int}

_WORDS = {int: "a whole number", float: "a number"}


def params_from(form: Mapping[str, str], fields: Mapping[str, type | dict[str, Any]]) -> dict[str, Any]:
    """The filled-in param fields of `form` as typed values; InvalidField on `params.NAME` for a bad one."""
    params: dict[str, Any] = {}
    for name, kind in fields.items():
        raw = (form.get(name) or "").strip()
        if not raw:
            continue
        if isinstance(kind, dict):
            if raw not in kind:
                raise InvalidField(f"{name.replace('_', ' ').capitalize()} must be one of {', '.join(kind)}, "
                                   f"not {echo(raw)}.", field=f"params.{name}")
            params[name] = dict(kind[raw])
            continue
        if kind is str:
            params[name] = raw
            continue
        try:
            params[name] = kind(raw)
        except ValueError:
            raise InvalidField(f"{name.replace('_', ' ').capitalize()} must be {_WORDS[kind]}, not {echo(raw)}.",
                               field=f"params.{name}") from None
    return params


def refuse_unstorable(form: Mapping[str, str], params: Mapping[str, type]) -> None:
    """InvalidField naming the first field whose text cannot be stored: a NUL character, which
    PostgreSQL's text refuses (the JSON API's schemas refuse it the same way)."""
    for name, value in form.items():
        if "\x00" in value:
            label = name.replace("_", " ").capitalize()
            raise InvalidField(f"{label} must not hold a NUL character (\\u0000).",
                               field=f"params.{name}" if name in params else name)


def shown_again(form: Mapping[str, str]) -> dict[str, str]:
    """A refused form's values to fill it in again with: what typed text cannot hold taken out."""
    return {name: value.replace("\x00", "") for name, value in form.items()}


def field_errors(err: HelixError, shown: set[str]) -> dict[str, Any]:
    """Errors for a form: the message under its field's name if the form `shown` has it (else under
    `form`, shown at the top), and any training-data problems under `problems`."""
    message = err.message
    problems = err.extra.get("problems")
    if problems:
        # The message repeats every problem on one line; the page lists them, so it keeps the summary.
        more = re.search(r" \(and \d+ more\)$", message)
        message = message.split(": ", 1)[0] + (f"{more.group(0)}:" if more else ":")
    errors: dict[str, Any] = {err.field if err.field in shown else "form": message}
    if problems:
        errors["problems"] = problems
    return errors
