"""Structured output and tool calls: the checks of `response_format`, `tools`, `tool_choice`,
`parallel_tool_calls`, `logprobs` and `top_logprobs`, one set for the native API and /v1.

The shapes are OpenAI's (see notes.md, "Structured output and tool calls"). Every JSON Schema a request
carries is compiled here as the runner will compile it (llguidance), so a schema the runner could not
honour is a 400 naming its field before anything is stored, not a task that fails on a GPU.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import llguidance
from jsonschema import Draft202012Validator, SchemaError

from helix_api.errors import InvalidField, echo
from helix_api.vocabulary import TOOL_CHOICES

# The params this module checks (params.check_params hands them over once their types are right).
NAMES = frozenset({"response_format", "tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs"})
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# OpenAI's rule for function and schema names; it also keeps a name safe inside the runner's grammars.
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# OpenAI's own cap: every tool's definition goes into the prompt, so hundreds would crowd out the chat.
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
# Exactly as the runner compiles a schema: the check must refuse what the runner would refuse, no more.
COMPILE_OPTIONS = {"whitespace_flexible": False}
# llguidance's default limits, named so the check runs under them explicitly: a schema whose grammar would
# grow past them (a recursion bomb, a product of anyOfs) is refused in milliseconds, not compiled for minutes.
_LIMITS = llguidance.LLParserLimits()
_ERROR_CHARS = 300


def _invalid(where: str, what: str) -> InvalidField:
    return InvalidField(f"Param {where!r} {what}", field=f"params.{where}")


def _keys(value: dict[str, Any], where: str, allowed: tuple[str, ...]) -> None:
    for key in value:
        if key not in allowed:
            raise _invalid(f"{where}.{key}", f"is not a field Helix takes here; allowed: {', '.join(allowed)}.")


def _object(value: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(where, f"must be {what}, not {echo(value)}.")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise _invalid(where, f"must be 1 to 64 letters, digits, _ or - (^[a-zA-Z0-9_-]{{1,64}}$), not {echo(value)}.")
    return value


def _optional(value: dict[str, Any], key: str, kind: type, where: str, what: str) -> None:
    if key in value and value[key] is not None and not isinstance(value[key], kind):
        raise _invalid(f"{where}.{key}", f"must be {what}, not {echo(value[key])}.")


def _nested(value: Any) -> Iterator[tuple[Any, int]]:
    """Every object and array inside `value` with its level (`value` itself is 1), without recursion."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            yield item, level
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))


def check_schema(schema: Any, where: str, *, max_bytes: int, max_depth: int) -> None:
    """A JSON Schema the runner can constrain a reply to; else InvalidField naming `where` (a params path).

    Cheapest first: the size caps, then JSON Schema's own rules, then llguidance's compile under its limits.
    """
    _object(schema, where, "a JSON Schema object")
    for _, level in _nested(schema):
        if level > max_depth:
            raise _invalid(where, f"nests deeper than {max_depth} levels (HELIX_MAX_SCHEMA_DEPTH).")
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
    if size > max_bytes:
        raise _invalid(where, f"is {size} bytes as JSON, over the limit of {max_bytes} (HELIX_MAX_SCHEMA_BYTES).")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as err:
        at = f" (at {err.json_path})" if err.path else ""
        raise _invalid(where, f"is not valid JSON Schema: {err.message[:_ERROR_CHARS]}{at}.") from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPILE_OPTIONS)
        problem = llguidance.LLMatcher.validate_grammar(grammar, None, limits=_LIMITS)
    except ValueError as err:
        problem = str(err)
    if problem:
        raise _invalid(where, f"uses what constrained decoding does not support: {problem[:_ERROR_CHARS]}")


def _response_format(value: Any, *, max_bytes: int, max_depth: int) -> None:
    value = _object(value, "response_format", 'an object like {"type": "json_object"}')
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise _invalid("response_format.type", f"must be one of {', '.join(RESPONSE_FORMATS)}, not {echo(kind)}.")
    if kind != "json_schema":
        _keys(value, "response_format", ("type",))
        return
    _keys(value, "response_format", ("type", "json_schema"))
    where = "response_format.json_schema"
    spec = _object(value.get("json_schema"), where, 'an object {"name", "schema", "strict"?, "description"?}')
    _keys(spec, where, ("name", "schema", "strict", "description"))
    _name(spec.get("name"), f"{where}.name")
    _optional(spec, "strict", bool, where, "true or false")
    _optional(spec, "description", str, where, "a string")
    if "schema" not in spec:
        raise _invalid(f"{where}.schema", "is required: the JSON Schema the reply must match.")
    check_schema(spec["schema"], f"{where}.schema", max_bytes=max_bytes, max_depth=max_depth)


def _tools(value: Any, *, max_bytes: int, max_depth: int) -> list[str]:
    """The tools' names, in order, once every tool is well formed."""
    if not isinstance(value, list):
        raise _invalid("tools", f"must be a list of tools, not {echo(value)}.")
    if len(value) > MAX_TOOLS:
        raise _invalid("tools", f"lists {len(value)} tools; at most {MAX_TOOLS} are allowed.")
    names: list[str] = []
    for index, tool in enumerate(value):
        where = f"tools[{index}]"
        _object(tool, where, 'an object {"type": "function", "function": {"name", ...}}')
        _keys(tool, where, ("type", "function"))
        if tool.get("type") != "function":
            raise _invalid(f"{where}.type", f"must be 'function' (the only kind of tool), not "
                                            f"{echo(tool.get('type'))}.")
        where += ".function"
        function = _object(tool.get("function"), where, 'an object {"name", "description"?, "parameters"?, "strict"?}')
        _keys(function, where, ("name", "description", "parameters", "strict"))
        if "name" not in function:
            raise _invalid(f"{where}.name", "is required: the name the model calls the tool by.")
        name = _name(function["name"], f"{where}.name")
        if name in names:
            raise _invalid(f"{where}.name", f"repeats {name!r}: each tool needs a name of its own.")
        names.append(name)
        _optional(function, "description", str, where, "a string")
        _optional(function, "strict", bool, where, "true or false")
        parameters = function.get("parameters")
        if parameters is not None:
            if isinstance(parameters, dict) and parameters.get("type") != "object":
                # A call's arguments are a JSON object, as every client reads them: the schema says so at its
                # top, or a model held to it (an anyOf of strings, say) could write arguments no client takes.
                raise _invalid(f"{where}.parameters", f'must be the schema of a JSON object, with "type": "object" '
                                                      f"at its top, not type {echo(parameters.get('type'))}.")
            check_schema(parameters, f"{where}.parameters", max_bytes=max_bytes, max_depth=max_depth)
    return names


def _tool_choice(value: Any, names: list[str]) -> None:
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise _invalid("tool_choice", f"must be none, auto, required or "
                                          f'{{"type": "function", "function": {{"name": ...}}}}, not {echo(value)}.')
        if value == "required" and not names:
            raise _invalid("tool_choice", "is 'required' but no tools are given: send them in 'tools'.")
        return
    choice = _object(value, "tool_choice", 'none, auto, required or {"type": "function", "function": {"name"}}')
    _keys(choice, "tool_choice", ("type", "function"))
    if choice.get("type") != "function":
        raise _invalid("tool_choice", f"has type {echo(choice.get('type'))}; the only type is 'function'.")
    function = _object(choice.get("function"), "tool_choice", '{"type": "function", "function": {"name": ...}}')
    _keys(function, "tool_choice.function", ("name",))
    name = function.get("name")
    if not names:
        raise _invalid("tool_choice", f"names the function {echo(name)} but no tools are given: send them in 'tools'.")
    if name not in names:
        raise _invalid("tool_choice", f"names the function {echo(name)}, which is not one of the tools: "
                                      f"{', '.join(names)}.")


def check(params: dict[str, Any], *, max_schema_bytes: int, max_schema_depth: int) -> None:
    """The structured-output and tool params of a text task, each checked; InvalidField naming the first
    at fault (`params.tools[1].function.name`, say). Types and ranges were checked by params.py."""
    if params.get("response_format") is not None:
        _response_format(params["response_format"], max_bytes=max_schema_bytes, max_depth=max_schema_depth)
    names = _tools(params.get("tools") or [], max_bytes=max_schema_bytes, max_depth=max_schema_depth)
    if params.get("tool_choice") is not None:
        _tool_choice(params["tool_choice"], names)
    # 0 alternatives asks for nothing: OpenAI's clients may send it by default, with or without logprobs.
    if params.get("top_logprobs") not in (None, 0) and params.get("logprobs") is not True:
        raise _invalid("top_logprobs", "needs 'logprobs': true (it says how many alternatives each token's "
                                       "log probability comes with).")
