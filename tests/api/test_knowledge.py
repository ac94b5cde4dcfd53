"""Knowledge bases: documents checked before anything is stored, owned by one user, and retrieval that
ranks with the database's own full-text search (FTS5 on SQLite, tsvector on PostgreSQL)."""

from __future__ import annotations

import io

from sqlalchemy import func, select

from helix_api.knowledge.retrieval import RetrievalSettings, chunk, ground, search, terms, with_context
from helix_api.models import KnowledgeChunk, KnowledgeDocument, Task
from tests.conftest import TEXT_MODEL

ZORBLAX = ("# The planet Zorblax\n\nZorblax is a small cold planet. Its capital city is Quintaria, built on a "
           "frozen lake.\n\nThe Zorblaxians trade crystals and sing at dawn.")
COOKING = "# Soup\n\nA good soup needs onions, carrots and patience. Simmer the broth for two hours."


def _kb(client, headers, name="notes") -> int:
    response = client.post("/api/v1/knowledge", json={"name": name}, headers=headers)
    assert response.status_code == 201, response.json
    return response.json["id"]


def _upload(client, headers, kb_id, *files):
    data = {"files": [(io.BytesIO(body), name) for name, body in files]}
    return client.post(f"/api/v1/knowledge/{kb_id}/files", data=data, headers=headers,
                       content_type="multipart/form-data")


def _count(db, model) -> int:
    with db.connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


def test_a_knowledge_base_holds_documents_cut_into_chunks(client, user):
    kb_id = _kb(client, user)
    response = _upload(client, user, kb_id, ("zorblax.md", ZORBLAX.encode()), ("soup.txt", COOKING.encode()))
    assert response.status_code == 201, response.json
    assert [d["name"] for d in response.json["documents"]] == ["zorblax.md", "soup.txt"]
    assert all(d["chunks"] >= 1 for d in response.json["documents"])
    listed = client.get(f"/api/v1/knowledge/{kb_id}/files", headers=user).json["documents"]
    assert [d["name"] for d in listed] == ["zorblax.md", "soup.txt"]
    [kb] = client.get("/api/v1/knowledge", headers=user).json["knowledge_bases"]
    assert kb["id"] == kb_id and kb["document_count"] == 2


def test_an_empty_document_or_a_binary_file_posing_as_text_is_refused_and_nothing_is_stored(client, user, db):
    kb_id = _kb(client, user)
    for name, body, said in [("empty.txt", b"  \n\n ", "empty"),
                             ("photo.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary"),
                             ("latin.md", "caf\xe9".encode("latin-1") * 10, "not UTF-8"),
                             ("report.pdf", b"%PDF-1.4", "not a text or Markdown file")]:
        response = _upload(client, user, kb_id, ("good.md", ZORBLAX.encode()), (name, body))
        assert response.status_code == 400, response.json
        assert response.json["error"] == "invalid_document"
        assert [p["file"] for p in response.json["problems"]] == [name] and said in response.json["message"]
    assert _count(db, KnowledgeDocument) == 0 and _count(db, KnowledgeChunk) == 0


def test_another_users_knowledge_base_is_a_404_everywhere(client, user, make_user, db):
    kb_id = _kb(client, user)
    stranger = make_user("mallory")
    assert client.get(f"/api/v1/knowledge/{kb_id}", headers=stranger).status_code == 404
    assert client.get(f"/api/v1/knowledge/{kb_id}/files", headers=stranger).status_code == 404
    assert _upload(client, stranger, kb_id, ("x.md", ZORBLAX.encode())).status_code == 404
    assert client.get("/api/v1/knowledge", headers=stranger).json["knowledge_bases"] == []
    response = client.post("/api/v1/sessions", headers=stranger, json={
        "model_name": TEXT_MODEL, "message": "What is the capital of Zorblax?", "knowledge": [kb_id]})
    assert response.status_code == 404 and response.json["field"] == "knowledge"
    response = client.post("/v1/chat/completions", headers=stranger, json={
        "model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}], "knowledge": [kb_id]})
    assert response.status_code == 404
    assert _count(db, Task) == 0
    assert _count(db, KnowledgeDocument) == 0


def test_a_session_naming_a_knowledge_base_sends_the_best_chunk_and_lists_it_as_a_source(client, user, db):
    kb_id = _kb(client, user)
    _upload(client, user, kb_id, ("soup.txt", COOKING.encode()), ("zorblax.md", ZORBLAX.encode()))
    created = client.post("/api/v1/sessions", headers=user, json={
        "model_name": TEXT_MODEL, "message": "What is the capital city of Zorblax?", "knowledge": [kb_id]})
    assert created.status_code == 201, created.json
    assert created.json["knowledge_bases"] == [kb_id]
    reply = created.json["interactions"][-1]
    assert reply["sources"][0]["document"] == "zorblax.md" and reply["sources"][0]["chunk"] == 0
    assert all(s["document"] != "soup.txt" for s in reply["sources"])
    with db.connect() as conn:
        task_input = conn.execute(select(Task.input)).scalar_one()
    system, question = task_input["messages"]
    assert system["role"] == "system" and "Quintaria" in system["content"] and "onions" not in system["content"]
    assert question == {"role": "user", "content": "What is the capital city of Zorblax?"}
    shown = client.get(f"/api/v1/sessions/{created.json['id']}", headers=user).json
    assert shown["interactions"][-1]["sources"] == reply["sources"]


def test_a_turn_that_matches_nothing_has_no_context_and_no_sources(client, user, db):
    kb_id = _kb(client, user)
    _upload(client, user, kb_id, ("zorblax.md", ZORBLAX.encode()))
    created = client.post("/api/v1/sessions", headers=user, json={
        "model_name": TEXT_MODEL, "message": "Hello there!", "knowledge": [kb_id]}).json
    assert created["interactions"][-1]["sources"] == []
    with db.connect() as conn:
        messages = conn.execute(select(Task.input)).scalar_one()["messages"]
    assert messages == [{"role": "user", "content": "Hello there!"}]


def test_ranking_puts_the_chunk_that_answers_first_on_either_database(client, user, db):
    kb_id = _kb(client, user)
    filler = "\n\n".join(f"Paragraph {i} talks about weather, rivers and the cost of bread in town {i}."
                         for i in range(40))
    _upload(client, user, kb_id, ("filler.txt", filler.encode()), ("zorblax.md", ZORBLAX.encode()))
    with db.connect() as conn:
        hits = search(conn, [kb_id], "Which city is the capital of the planet Zorblax?", 3)
        assert hits[0].document == "zorblax.md" and "Quintaria" in hits[0].text
        assert hits == sorted(hits, key=lambda h: -h.score)
        # Stemming: "trading crystals" finds "trade crystals".
        assert search(conn, [kb_id], "trading crystals", 1)[0].document == "zorblax.md"
        assert search(conn, [kb_id + 1], "Zorblax", 3) == []
        grounding = ground(conn, [kb_id], "capital of Zorblax", RetrievalSettings(top_k=2, max_context_chars=10_000))
    assert grounding is not None and grounding.sources[0]["document"] == "zorblax.md"


def test_v1_chat_answers_list_their_sources(client, user, runner, db):
    kb_id = _kb(client, user)
    _upload(client, user, kb_id, ("zorblax.md", ZORBLAX.encode()))
    import threading

    from tests.conftest import claim

    def answer():
        for _ in range(200):
            response = claim(client, runner, wait=1)
            if response.status_code == 200:
                task, lease = response.json["task"], response.json["lease"]
                assert "Quintaria" in task["input"]["messages"][0]["content"]
                client.post(f"/api/v1/worker/task/{task['id']}/complete", headers=runner,
                            json={"lease_token": lease["token"], "result": {"text": "Quintaria."}})
                return

    thread = threading.Thread(target=answer)
    thread.start()
    response = client.post("/v1/chat/completions", headers=user, json={
        "model": TEXT_MODEL, "messages": [{"role": "user", "content": "Capital of Zorblax?"}], "knowledge": [kb_id]})
    thread.join()
    assert response.status_code == 200, response.json
    assert response.json["choices"][0]["message"]["content"] == "Quintaria."
    assert response.json["sources"][0]["document"] == "zorblax.md"


def test_chunks_keep_paragraphs_and_cut_long_ones_with_overlap():
    assert chunk("one\n\ntwo\n\n\nthree", 100, 10) == ["one\n\ntwo\n\nthree"]
    long = " ".join(f"w{i}" for i in range(100))
    pieces = chunk(long, 50, 12)
    assert all(len(p) <= 50 for p in pieces) and len(pieces) > 5
    assert pieces[0].split()[-1] in pieces[1]  # the overlap repeats the cut's last words
    assert " ".join(dict.fromkeys(w for p in pieces for w in p.split())) == long


def test_terms_drop_common_words_and_punctuation():
    assert terms("What is the capital of Zorblax? Zorblax's capital!") == ["capital", "zorblax"]
    assert terms("\"OR\" NEAR(a b) * -") == ["near"]


def test_context_goes_into_the_system_message():
    from helix_api.knowledge.retrieval import Grounding

    g = Grounding(system="CONTEXT", sources=[])
    assert with_context([{"role": "user", "content": "q"}], g)[0] == {"role": "system", "content": "CONTEXT"}
    merged = with_context([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], g)
    assert merged[0]["content"] == "Be brief.\n\nCONTEXT" and len(merged) == 2
