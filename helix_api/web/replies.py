"""How the session page shows a reply that is not prose: JSON asked for by `response_format`, and tool calls.

Registered as template filters on the web blueprint (`asks_for_json`, `pretty_json`); the page's tool
calls are the session JSON's own (each interaction's `tool_calls`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

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
