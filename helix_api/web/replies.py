"""How the session page shows a reply that is not prose: JSON asked for by `response_format`, and tool calls.

Registered as template filters on the web blueprint (`asks_for_json`, `pretty_json`); the page's tool
calls are the session JSON's own (each interaction's `tool_calls`).
"""

from __future__ import annotations

from helix_api.cli.shapes import asks_for_json, pretty_json
from helix_api.web import bp

# The CLI prints replies the same way: one reading of "asks for JSON", one indenting of it.
bp.app_template_filter("asks_for_json")(asks_for_json)
bp.app_template_filter("pretty_json")(pretty_json)
