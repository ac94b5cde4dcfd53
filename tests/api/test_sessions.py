"""The session API: create, continue, show, list, cancel, and the event stream."""

from __future__ import annotations

import json
import threading

from tests.conftest import IMAGE_ALIAS, IMAGE_MODEL, TEXT_ALIAS, TEXT_MODEL, claim


def _finish(client, runner, text: str) -> dict:
    claimed = claim(client, runner).json
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                json={"lease_token": claimed["lease"]["token"], "result": {"text": text}})
    return claimed["task"]


def _sse(client, user, session_id: int, after: str | None = None, header: bool = True) -> list[dict]:
    headers = dict(user)
    url = f"/api/v1/sessions/{session_id}/events?follow=0"
    if after is not None and header:
        headers["Last-Event-ID"] = str(after)
    elif after is not None:
        url += f"&after={after}"
    response = client.get(url, headers=headers)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = []
    for block in response.data.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and
                      not line.startswith(":"))
        if "data" in fields:
            events.append({"id": fields["id"], "event": fields["event"], **json.loads(fields["data"])})
    return events


def test_create_returns_session_with_queued_reply(client, user):
    response = client.post("/api/v1/sessions", headers=user, json={
        "mode": "create", "type": "text", "model_name": TEXT_MODEL, "message": "Hello!",
        "params": {"max_new_tokens": 8}})
    assert response.status_code == 201
    session = response.json
    assert session["mode"] == "create" and session["type"] == "text" and session["state"] == "queued"
    asked, reply = session["interactions"]
    assert asked["creator"] == "user" and asked["message"] == "Hello!"
    assert reply["creator"] == "assistant" and reply["state"] == "queued" and reply["queue_position"] == 1
    assert reply["task"]["status"] == "queued" and reply["params"] == {"max_new_tokens": 8}


def test_image_session_task_carries_prompt(client, user, runner):
    client.post("/api/v1/sessions", headers=user, json={
        "type": "image", "model_name": IMAGE_MODEL, "message": "a red fox"})
    task = claim(client, runner, model=IMAGE_MODEL, type="image").json["task"]
    assert task["type"] == "image" and task["input"]["prompt"] == "a red fox"


def test_continuing_carries_the_whole_conversation(client, user, runner, task_factory):
    session = task_factory(message="first question")
    _finish(client, runner, "first answer")
    response = client.post(f"/api/v1/sessions/{session['id']}/messages", headers=user,
                           json={"message": "second question"})
    assert response.status_code == 201
    task = claim(client, runner).json["task"]
    assert task["input"]["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]


def test_failed_turns_are_left_out_of_the_conversation(client, user, runner, task_factory):
    session = task_factory(message="doomed")
    claimed = claim(client, runner).json
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/fail", headers=runner,
                json={"lease_token": claimed["lease"]["token"], "error": "x", "retry": False})
    client.post(f"/api/v1/sessions/{session['id']}/messages", headers=user, json={"message": "again"})
    task = claim(client, runner).json["task"]
    assert task["input"]["messages"] == [{"role": "user", "content": "again"}]


def test_message_while_answering_is_409(client, user, task_factory):
    session = task_factory()
    response = client.post(f"/api/v1/sessions/{session['id']}/messages", headers=user,
                           json={"message": "hurry up"})
    assert response.status_code == 409 and response.json["error"] == "session_busy"
    assert len(client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"]) == 2


def test_queue_position_counts_work_ahead(client, user, task_factory):
    sessions = [task_factory(message=f"m{i}") for i in range(3)]
    positions = [client.get(f"/api/v1/sessions/{s['id']}", headers=user).json["interactions"][-1]
                 ["queue_position"] for s in sessions]
    assert positions == [1, 2, 3]



def test_a_reply_says_its_phase_from_queued_to_generating_to_complete(client, user, runner, task_factory):
    session = task_factory()

    def phase() -> str:
        return client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]["phase"]

    assert phase() == "queued"
    claimed = claim(client, runner).json
    task_id, token = claimed["task"]["id"], claimed["lease"]["token"]
    assert phase() == "loading"  # claimed, nothing out yet
    client.post(f"/api/v1/worker/task/{task_id}/events", headers=runner,
                json={"lease_token": token, "events": [{"seq": 1, "kind": "token", "text": "Hi"}]})
    assert phase() == "generating"
    client.post(f"/api/v1/worker/task/{task_id}/complete", headers=runner,
                json={"lease_token": token, "result": {"text": "Hi"}})
    assert phase() == "complete"


def test_list_is_newest_first_and_paginated(client, user, make_user, task_factory):
    ids = [task_factory(message=f"m{i}")["id"] for i in range(5)]
    task_factory(headers=make_user("bob"), message="not alice's")
    first = client.get("/api/v1/sessions?limit=2", headers=user).json
    assert [s["id"] for s in first["sessions"]] == ids[::-1][:2]
    second = client.get(f"/api/v1/sessions?limit=2&before={first['next_before']}", headers=user).json
    third = client.get(f"/api/v1/sessions?limit=2&before={second['next_before']}", headers=user).json
    assert [s["id"] for s in second["sessions"] + third["sessions"]] == ids[::-1][2:]
    assert third["next_before"] is None


def test_someone_elses_session_is_404(client, make_user, task_factory):
    session = task_factory()
    bob = make_user("bob")
    for method, url in [("get", f"/api/v1/sessions/{session['id']}"),
                        ("post", f"/api/v1/sessions/{session['id']}/cancel"),
                        ("get", f"/api/v1/sessions/{session['id']}/events?follow=0")]:
        response = getattr(client, method)(url, headers=bob)
        assert response.status_code == 404, url
    response = client.post(f"/api/v1/sessions/{session['id']}/messages", headers=bob, json={"message": "hi"})
    assert response.status_code == 404


def test_cancel_queued_task(client, user, runner, task_factory):
    session = task_factory()
    response = client.post(f"/api/v1/sessions/{session['id']}/cancel", headers=user)
    assert response.status_code == 200 and response.json["interactions"][-1]["state"] == "cancelled"
    assert claim(client, runner).status_code == 204
    again = client.post(f"/api/v1/sessions/{session['id']}/cancel", headers=user)
    assert again.status_code == 409 and again.json["error"] == "not_cancellable"


def test_events_replay_everything_in_order(client, user, runner, task_factory):
    session = task_factory()
    claimed = claim(client, runner).json
    tokens = ["The ", "quick ", "brown ", "fox"]
    for i, text in enumerate(tokens, start=1):
        client.post(f"/api/v1/worker/task/{claimed['task']['id']}/events", headers=runner,
                    json={"lease_token": claimed["lease"]["token"],
                          "events": [{"seq": i, "kind": "token", "text": text}]})
    _ = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                    json={"lease_token": claimed["lease"]["token"], "result": {"text": "".join(tokens)}})
    events = _sse(client, user, session["id"])
    # Rows are numbered; the reply's text follows the row before it, its id carrying the text's end.
    assert [e["id"] for e in events] == ["1", "2", "2.19", "3"]
    assert [e["event"] for e in events] == ["state", "state", "token", "state"]
    assert "".join(e["text"] for e in events if e["event"] == "token") == "The quick brown fox"
    assert events[-1]["state"] == "complete"


def test_events_resume_after_last_event_id(client, user, runner, task_factory):
    session = task_factory()
    claimed = claim(client, runner).json
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/events", headers=runner,
                json={"lease_token": claimed["lease"]["token"],
                      "events": [{"seq": 1, "kind": "token", "text": "a"}, {"seq": 2, "kind": "token", "text": "b"}]})
    everything = _sse(client, user, session["id"])
    assert [(e["id"], e.get("text")) for e in everything] == [("1", None), ("2", None), ("2.2", "ab")]
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/events", headers=runner,
                json={"lease_token": claimed["lease"]["token"], "events": [{"seq": 3, "kind": "token", "text": "c"}]})
    # From the end of what a client had, from inside it, and from the row before the text.
    for after, expected in (("2.2", "c"), ("2.1", "bc"), ("2", "abc")):
        tail = _sse(client, user, session["id"], after=after)
        assert [(e["id"], e["text"], e["offset"]) for e in tail] == [("2.3", expected, 3 - len(expected))]
        assert _sse(client, user, session["id"], after=after, header=False) == tail
    assert _sse(client, user, session["id"], after="2.3") == []


def test_live_stream_delivers_events_as_they_are_stored(client, user, runner, task_factory, app):
    session = task_factory()
    claimed = claim(client, runner).json
    seen: list[str] = []
    done = threading.Event()

    def follow() -> None:
        with app.test_client() as reader:
            response = reader.get(f"/api/v1/sessions/{session['id']}/events", headers=user, buffered=False)
            for chunk in response.response:
                text = chunk.decode() if isinstance(chunk, bytes) else chunk
                seen.append(text)
                if '"state": "complete"' in text:
                    break
            response.close()
            done.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    token = claimed["lease"]["token"]
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/events", headers=runner,
                json={"lease_token": token, "events": [{"seq": 1, "kind": "token", "text": "live!"}]})
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                json={"lease_token": token, "result": {"text": "live!"}})
    assert done.wait(10), "the stream did not deliver the completion"
    assert any('"text": "live!"' in chunk for chunk in seen)


def test_bad_last_event_id_is_400(client, user, task_factory):
    session = task_factory()
    response = client.get(f"/api/v1/sessions/{session['id']}/events",
                          headers={**user, "Last-Event-ID": "abc"})
    assert response.status_code == 400 and response.json["field"] == "Last-Event-ID"


def test_models_lists_defaults_by_alias_with_their_hub_ids(client, user):
    models = {m["name"]: m for m in client.get("/api/v1/models", headers=user).json["models"]}
    assert {name: m["type"] for name, m in models.items()} == {TEXT_ALIAS: "text", IMAGE_ALIAS: "image"}
    assert models[TEXT_ALIAS]["full_name"] == TEXT_MODEL and models[IMAGE_ALIAS]["alias"] == IMAGE_ALIAS
