"""Replies in a shape for `helix chat`: the params of --json, --json-schema, --tools and --tool-choice, read
and checked before anything is sent, and how a JSON reply and a reply of tool calls are printed.

The params are OpenAI's own shapes (`response_format`, `tools`, `tool_choice`), as the API stores them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from helix_api.vocabulary import JSON_RESPONSE_FORMATS, TOOL_CHOICES

_TOOL_SHAPE = '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
# OpenAI's rule for a schema's name: what a file's stem becomes once other characters are replaced.
_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]")


def _json_file(path: Path, option: str) -> Any:
    """The JSON value in the file `path`; a BadParameter of `option` when it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint=option) from None
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint=option) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"{path} is not JSON: {exc}", param_hint=option) from None


def schema_format(path: Path) -> dict[str, Any]:
    """The `response_format` of a JSON Schema file: json_schema, named after the file's stem."""
    schema = _json_file(path, "--json-schema")
    if not isinstance(schema, dict):
        raise click.BadParameter(f"{path} must hold a JSON Schema (an object), not {type(schema).__name__}",
                                 param_hint="--json-schema")
    name = _NAME_CHARACTERS.sub("_", path.stem)[:64] or "reply"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def tool_definitions(path: Path) -> list[dict[str, Any]]:
    """The `tools` of a file holding a list of OpenAI tool definitions, each a function with a unique name."""
    tools = _json_file(path, "--tools")
    if not isinstance(tools, list) or not tools:
        raise click.BadParameter(f"{path} must hold a list of tools, each {_TOOL_SHAPE}", param_hint="--tools")
    names: set[str] = set()
    for number, tool in enumerate(tools, start=1):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not (isinstance(name, str) and name and tool.get("type") == "function"):
            raise click.BadParameter(f"tool {number} of {path} is not {_TOOL_SHAPE}", param_hint="--tools")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise click.BadParameter(f"the parameters of tool {name!r} in {path} must be a JSON Schema (an object)",
                                     param_hint="--tools")
        if name in names:
            raise click.BadParameter(f"{path} names the tool {name!r} twice", param_hint="--tools")
        names.add(name)
    return tools


def tool_choice(choice: str, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    """The `tool_choice` of --tool-choice: none, auto, required, or the name of one of `tools` to call."""
    if tools is None:
        raise click.BadParameter("needs --tools", param_hint="--tool-choice")
    if choice in TOOL_CHOICES:
        return choice
    names = [tool["function"]["name"] for tool in tools]
    if choice not in names:
        raise click.BadParameter(f"must be {', '.join(TOOL_CHOICES)} or a tool of --tools ({', '.join(names)}), "
                                 f"not {choice!r}", param_hint="--tool-choice")
    return {"type": "function", "function": {"name": choice}}


def reply_params(*, as_json: bool, schema: Path | None, tools: Path | None, choice: str | None) -> dict[str, Any]:
    """The params that shape every reply of a chat; a click error for a bad file or option, before any call."""
    if as_json and schema is not None:
        raise click.UsageError("--json and --json-schema are two ways to ask for JSON: pass one")
    params: dict[str, Any] = {}
    if as_json:
        params["response_format"] = {"type": "json_object"}
    elif schema is not None:
        params["response_format"] = schema_format(schema)
    if tools is not None:
        params["tools"] = tool_definitions(tools)
    if choice is not None:
        params["tool_choice"] = tool_choice(choice, params.get("tools"))
    return params


def asks_for_json(params: Mapping[str, Any] | None) -> bool:
    """Whether a message's params ask for a JSON reply."""
    response_format = (params or {}).get("response_format")
    return isinstance(response_format, Mapping) and response_format.get("type") in JSON_RESPONSE_FORMATS


def pretty_json(text: str | None) -> str:
    """JSON text indented for reading; text that does not parse (a reply cut short, say) as it is."""
    if not text:
        return text or ""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def _one_line(text: str) -> str:
    """JSON text on one line (`{"city": "Paris"}`); anything else with its whitespace squeezed."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return " ".join(text.split())


def tool_call_lines(call: Mapping[str, Any]) -> list[str]:
    """A tool call as lines: `→ call get_weather {"city": "Paris"}`, and `← ...` for its result when there is one."""
    lines = [f"→ call {call.get('name')} {_one_line(str(call.get('arguments') or '{}'))}"]
    if call.get("result") is not None:
        lines.append(f"← {_one_line(str(call['result']))}")
    return lines
