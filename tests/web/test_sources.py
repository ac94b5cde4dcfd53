"""The web app shows a reply's sources: the documents and chunks retrieval gave the model."""

from __future__ import annotations

import io

from tests.conftest import TEXT_MODEL, bearer

LIBRARY = "# Glimmerwood\n\nThe head librarian of the Glimmerwood Library is Orla Fenwick."


def test_a_reply_drawn_from_a_knowledge_base_lists_its_sources_on_the_session_page(browser, client):
    key = bearer(browser.key)
    kb = client.post("/api/v1/knowledge", headers=key, json={"name": "notes"}).json
    client.post(f"/api/v1/knowledge/{kb['id']}/files", headers=key, content_type="multipart/form-data",
                data={"files": [(io.BytesIO(LIBRARY.encode()), "library.md")]})
    session = client.post("/api/v1/sessions", headers=key, json={
        "model_name": TEXT_MODEL, "message": "Who is the Glimmerwood librarian?", "knowledge": [kb["id"]]}).json
    page = browser.get(f"/sessions/{session['id']}").data.decode()
    assert 'class="sources"' in page and "library.md (chunk 0)" in page
    plain = client.post("/api/v1/sessions", headers=key, json={"model_name": TEXT_MODEL, "message": "Hi"}).json
    assert 'class="sources"' not in browser.get(f"/sessions/{plain['id']}").data.decode()
