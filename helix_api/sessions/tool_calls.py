"""Tool calls of assistant replies as rows of `tool_calls`, and back as OpenAI's and the session JSON's shapes.

Rows come from two places: a runner's result (`transitions.complete`) and the earlier turns of a /v1 chat
(`records.create_from_messages`), where a later `tool` message gives a call its `result`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert

from helix_api.models import ToolCall

_TABLE = ToolCall.__table__
_INSERT = insert(_TABLE)
CALL_ID_CHARS = _TABLE.c.call_id.type.length  # the longest call id a chat may carry
_NAME_CHARS = _TABLE.c.name.type.length


def row(*, session_id: int | None, interaction_id: int | None, position: int, call_id: str, name: str,
        arguments: Any, result: str | None, now: datetime | None) -> dict[str, Any]:
    """The values of one row; cut to the columns' sizes, as a runner's result is not checked like a request."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return {"session_id": session_id, "interaction_id": interaction_id, "position": position,
            "call_id": str(call_id)[:CALL_ID_CHARS], "name": str(name)[:_NAME_CHARS], "arguments": arguments,
            "result": result, "created_at": now}


def of_result(result: dict[str, Any], *, session_id: int | None = None, interaction_id: int | None = None,
              now: datetime | None = None) -> list[dict[str, Any]]:
    """Rows of a runner's `result["tool_calls"]` ([{"id", "name", "arguments"}]); none when it has none.

    The one reading of a result's calls: what is stored and what /v1 answers are the same."""
    calls = result.get("tool_calls")
    if not isinstance(calls, list):
        return []
    return [row(session_id=session_id, interaction_id=interaction_id, position=position, call_id=call.get("id") or "",
                name=call.get("name") or "", arguments=call.get("arguments") or "{}", result=None, now=now)
            for position, call in enumerate(c for c in calls if isinstance(c, dict))]


def write(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert `rows` in one statement; nothing at all when there are none."""
    if rows:
        conn.execute(_INSERT, rows)


def as_json(call: Any) -> dict[str, Any]:
    """A stored call as the session JSON shows it."""
    return {"id": call.call_id, "name": call.name, "arguments": call.arguments, "result": call.result}


def as_message(call: Any) -> dict[str, Any]:
    """A stored call (a row, or `row()`'s values) as an assistant message's `tool_calls` item (OpenAI's shape,
    the task input's too)."""
    if isinstance(call, dict):
        return {"id": call["call_id"], "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]}}
    return {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
