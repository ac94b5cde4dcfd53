"""How the session page shows a reply that is not prose: JSON asked for by `response_format`, and tool calls.

Registered as template filters on the web blueprint (`asks_for_json`, `pretty_json`); the page's tool
calls come from `with_tool_calls`, which takes them grouped per interaction id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select

from helix_api import models
from helix_api.db import Database
from helix_api.vocabulary import JSON_RESPONSE_FORMATS
from helix_api.web import bp


@bp.app_template_filter("asks_for_json")
def asks_for_json(params: Mapping[str, Any] | None) -> bool:
    """Whether a message's params ask for a JSON reply (`response_format` json_object or json_schema)."""
    response_format = (params or {}).get("response_format")
    return isinstance(response_format, Mapping) and response_format.get("type") in JSON_RESPONSE_FORMATS


@bp.app_template_filter("pretty_json")
def pretty_json(text: str | None) -> str:
    """JSON text indented for reading; text that does not parse (a reply cut short, say) as it is."""
    if not text:
        return text or ""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return json.dumps(value, indent=2, ensure_ascii=False)


def with_tool_calls(interactions: Iterable[dict[str, Any]],
                    calls: Mapping[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The interactions, each with its `tool_calls` ([{"id", "name", "arguments", "result"}], in order).

    An interaction that carries `tool_calls` already (the session JSON does once it has them) keeps its
    own; the others take theirs from `calls`, keyed by interaction id.
    """
    return [item if "tool_calls" in item else {**item, "tool_calls": list(calls.get(item["id"], []))}
            for item in interactions]


def tool_calls_of(database: Database, session_id: int) -> dict[int, list[dict[str, Any]]]:
    """A session's tool calls grouped per interaction id, in the order the model made them."""
    # TODO(merge): models.ToolCall comes with the tool-call storage (migration 0009_tool_calls). Once the
    # session JSON gives each interaction its `tool_calls`, with_tool_calls keeps those and this read can go.
    tool_call = getattr(models, "ToolCall", None)
    if tool_call is None:
        return {}
    grouped: dict[int, list[dict[str, Any]]] = {}
    with database.orm_read() as db:
        rows = db.scalars(select(tool_call).where(tool_call.session_id == session_id)
                          .order_by(tool_call.interaction_id, tool_call.position))
        for row in rows:
            grouped.setdefault(row.interaction_id, []).append(
                {"id": row.call_id, "name": row.name, "arguments": row.arguments, "result": row.result})
    return grouped
