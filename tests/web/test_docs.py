"""The API reference page (/docs): the OpenAPI document rendered on the server, its Markdown as HTML."""

from __future__ import annotations

import re

from helix_api.web.docs import type_of


def test_the_reference_page_shows_every_operation_from_the_document(client):
    spec = client.get("/api/v1/openapi.json").json
    html = client.get("/docs").get_data(as_text=True)

    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            assert f'<h3 id="{op["operationId"]}"><code>{method.upper()} {path}</code></h3>' in html
    assert '<h3 id="ParamsTextCreate">ParamsTextCreate</h3>' in html
    assert "<td>integer (minimum 1, maximum 4096)</td>" in html  # max_new_tokens, with the operator's limit


def test_the_reference_page_renders_markdown_and_shows_html_as_text(client):
    html = client.get("/docs").get_data(as_text=True)

    assert "`" not in html  # every code span of the descriptions became <code>
    assert "Answer a chat: a <code>chat.completion</code>, or with <code>stream</code> Server-Sent chunks" in html
    # "POST /api/v1/knowledge/<id>/files" in a description: <id> is text to read, not a tag to drop.
    assert "/api/v1/knowledge/&lt;id&gt;/files (multipart)" in html
    assert "<id>" not in html


def test_the_reference_page_loads_nothing_from_another_site(client):
    html = client.get("/docs").get_data(as_text=True)

    sources = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="([^"]+)"', html)
    assert sources and all(src.startswith("/") and not src.startswith("//") for src in sources), sources


def test_a_schema_is_named_in_a_few_words():
    assert type_of({"type": "integer", "minimum": 1, "maximum": 100.0}) == "integer (minimum 1, maximum 100)"
    assert type_of({"anyOf": [{"type": "string"}, {"type": "null"}]}) == "string | null"
    assert type_of({"type": "array", "items": {"$ref": "#/components/schemas/TokenEvent"}}) == "TokenEvent[]"
    assert type_of({"enum": ["sft", "dpo"]}) == '"sft" | "dpo"'
