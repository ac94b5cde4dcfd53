"""The web app's session pages: forms that start and continue sessions, and the twins their script reads."""

from __future__ import annotations

import io
import re

import pytest
from sqlalchemy import select

from helix_api.models import Task, TaskStatus
from tests.conftest import IMAGE_ALIAS, IMAGE_MODEL, TEXT_ALIAS, TEXT_MODEL, bearer, claim
from tests.web.conftest import sign_in, submit


def new_chat(browser, message="Hello there", **fields):
    return submit(browser, "/new/chat", {"model_name": TEXT_MODEL, "message": message, **fields})


def session_id_of(response) -> int:
    assert response.status_code == 302, response.data.decode()[:3000]
    return int(re.fullmatch(r"/sessions/(\d+)", response.headers["Location"]).group(1))


def tasks(db) -> list[Task]:
    with db.orm_read() as s:
        return list(s.scalars(select(Task).order_by(Task.id)))


def test_the_new_chat_form_offers_the_text_models_only(browser):
    page = browser.get("/new/chat").data.decode()
    assert f'<option value="{TEXT_ALIAS}"' in page and IMAGE_ALIAS not in page and TEXT_MODEL not in page
    assert 'name="max_new_tokens"' in page and "<summary>Advanced</summary>" in page


def test_a_chat_from_the_form_queues_a_task(browser, db):
    session_id = session_id_of(new_chat(browser, "Tell me a story", max_new_tokens="64", temperature="0.5",
                                        top_p="", seed="7"))

    [task] = tasks(db)
    assert (task.session_id, task.status, task.mode.value, task.type.value, task.model_name) == (
        session_id, TaskStatus.QUEUED, "create", "text", TEXT_MODEL)
    assert task.params == {"max_new_tokens": 64, "temperature": 0.5, "seed": 7}  # typed; empty fields left out
    assert task.input["messages"] == [{"role": "user", "content": "Tell me a story"}]
    page = browser.get(f"/sessions/{session_id}").data.decode()
    assert "Tell me a story" in page and "data-live-reply" in page
    assert 'data-phase="queued"' in page and "queued (1 in line)" in page


def test_a_queued_reply_shows_when_it_should_start(browser, client, runner):
    client.get(f"/api/v1/worker/task?mode=create&type=text&model_name={TEXT_MODEL}",
               headers=runner)  # a live runner of the model (it finds nothing yet)
    session_id = session_id_of(new_chat(browser, "Tell me a story"))
    page = browser.get(f"/sessions/{session_id}").data.decode()
    assert "queued (1 in line)" in page and re.search(r'class="estimate">starts in about \d+ s<', page)


@pytest.mark.parametrize("fields,field,message", [
    ({"temperature": "warm"}, "params.temperature", "Temperature must be a number, not &#39;warm&#39;"),
    ({"max_new_tokens": "0"}, "params.max_new_tokens", "Param &#39;max_new_tokens&#39; must be an integer, &gt;= 1"),
    ({"message": "   "}, "message", "Field &#39;message&#39; must not be empty"),
    ({"model_name": "gpt-5"}, "model_name", "Unknown text model &#39;gpt-5&#39;"),
])
def test_a_refused_chat_shows_the_error_by_its_field_and_keeps_what_was_typed(browser, db, fields, field, message):
    form = {"model_name": TEXT_MODEL, "message": "Keep this text", "temperature": "0.3", **fields}
    response = submit(browser, "/new/chat", form)

    assert response.status_code == 400
    html = response.data.decode()
    assert f'<p class="field-error" data-field="{field}">{message}' in html
    typed = form["message"]
    assert f">{typed}</textarea>" in html
    assert f'value="{form["temperature"]}"' in html
    assert tasks(db) == []


def test_an_image_from_the_form_queues_a_task_with_its_params(browser, db):
    page = browser.get("/new/image").data.decode()
    assert f'<option value="{IMAGE_ALIAS}"' in page and TEXT_ALIAS not in page

    response = submit(browser, "/new/image", {"model_name": IMAGE_MODEL, "message": "a red fox", "width": "512",
                                              "height": "384", "num_inference_steps": "20", "num_images": "2",
                                              "seed": "3", "guidance_scale": "", "negative_prompt": "blurry"})

    session_id_of(response)
    [task] = tasks(db)
    assert task.type.value == "image" and task.input["prompt"] == "a red fox"
    assert task.params == {"width": 512, "height": 384, "num_inference_steps": 20, "num_images": 2, "seed": 3,
                           "negative_prompt": "blurry"}
    bad = submit(browser, "/new/image", {"model_name": IMAGE_MODEL, "message": "x", "width": "500"})
    assert bad.status_code == 400 and b'data-field="params.width">Param &#39;width&#39; must be' in bad.data


def continue_form_shown(html: str) -> bool:
    form = re.search(r'<form [^>]*class="continue"[^>]*>', html)
    return form is not None and "hidden" not in form.group(0)


def finish(client, runner, text="General Kenobi."):
    claimed = claim(client, runner).json
    token = claimed["lease"]["token"]
    done = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                       json={"lease_token": token, "result": {"text": text}})
    assert done.status_code == 200, done.json
    return claimed["task"]


def test_a_session_continues_from_its_page(browser, client, runner, db):
    session_id = session_id_of(new_chat(browser))
    page = f"/sessions/{session_id}"
    busy = submit(browser, f"{page}/messages", {"message": "Too soon"}, page=page)
    assert busy.status_code == 409 and b"still answering" in busy.data and b">Too soon</textarea>" in busy.data
    finish(client, runner)

    html = browser.get(page).data.decode()
    assert "General Kenobi." in html and "data-live-reply" not in html and 'data-phase="complete"' in html
    assert continue_form_shown(html)

    response = submit(browser, f"{page}/messages", {"message": "And then?", "max_new_tokens": "8"}, page=page)

    assert response.status_code == 302 and response.headers["Location"] == page
    first, second = tasks(db)
    assert second.priority < first.priority and second.params == {"max_new_tokens": 8}
    assert second.input["messages"][-3:] == [{"role": "user", "content": "Hello there"},
                                             {"role": "assistant", "content": "General Kenobi."},
                                             {"role": "user", "content": "And then?"}]


def test_the_cancel_button_cancels_the_running_reply(browser, client, runner, db):
    session_id = session_id_of(new_chat(browser))
    claim(client, runner)
    page = f"/sessions/{session_id}"

    response = submit(browser, f"{page}/cancel", page=page)

    assert response.status_code == 302
    [task] = tasks(db)
    assert task.status == TaskStatus.CANCELLED
    again = submit(browser, f"{page}/cancel", page=page, follow_redirects=True)
    assert b"nothing queued or running to cancel" in again.data and b'data-phase="cancelled"' in again.data


def test_the_twins_serve_state_events_and_files_by_cookie(browser, client, runner):
    session_id = session_id_of(new_chat(browser))
    claimed = claim(client, runner).json
    task_id, token = claimed["task"]["id"], claimed["lease"]["token"]
    client.post(f"/api/v1/worker/task/{task_id}/events", headers=runner, json={
        "lease_token": token, "events": [{"seq": 1, "kind": "token", "text": "Hel"},
                                         {"seq": 2, "kind": "token", "text": "lo"}]})

    state = browser.get(f"/sessions/{session_id}/state")
    assert state.status_code == 200 and state.json["interactions"][-1]["output"] == "Hello"
    assert state.json["interactions"][-1]["phase"] == "generating"

    events = browser.get(f"/sessions/{session_id}/events?follow=0")
    assert events.mimetype == "text/event-stream"
    assert re.findall(r"^id: ([\d.]+)$", events.data.decode(), re.M) == ["1", "2", "2.5"]
    resumed = browser.get(f"/sessions/{session_id}/events?follow=0", headers={"Last-Event-ID": "2.3"})
    assert re.findall(r"^event: (\w+)$", resumed.data.decode(), re.M) == ["token"]
    assert '"text": "lo"' in resumed.data.decode()

    page = browser.get(f"/sessions/{session_id}").data.decode()
    assert 'data-live-reply data-after="0"' in page  # the page replays its reply from the start
    assert not continue_form_shown(page)  # not while a reply is open


def test_someone_elses_session_is_a_404_page_and_so_are_its_twins(browser, make_browser, client):
    created = client.post("/api/v1/sessions", headers=bearer(browser.key), data={
        "mode": "finetune", "type": "text", "model_name": TEXT_MODEL,
        "files": [(io.BytesIO(b"".join(
            b'{"question": "q%d", "answer": "a"}\n' % i for i in range(10))), "d.jsonl")]},
        content_type="multipart/form-data")
    assert created.status_code == 201, created.json
    session_id = created.json["id"]
    file_id = created.json["interactions"][0]["files"][0]["id"]
    assert browser.get(f"/sessions/{session_id}/files/{file_id}").status_code == 200

    mallory = make_browser("mallory")
    for path in (f"/sessions/{session_id}", f"/sessions/{session_id}/events", f"/sessions/{session_id}/state",
                 f"/sessions/{session_id}/files/{file_id}", "/sessions/999999"):
        response = mallory.get(path)
        assert response.status_code == 404 and response.mimetype == "text/html", path
        assert b"404" in response.data
    refused = submit(mallory, f"/sessions/{session_id}/messages", {"message": "hi"}, page="/")
    assert refused.status_code == 404 and refused.mimetype == "text/html"
    assert submit(mallory, f"/sessions/{session_id}/cancel", page="/").status_code == 404


def test_the_session_list_pages_like_the_api(make_client, make_key):
    browser = make_client(PAGE_SIZE=2)
    key = make_key("carol")
    sign_in(browser, key)
    ids = [session_id_of(new_chat(browser, f"chat number {i}")) for i in range(3)]

    first = browser.get("/").data.decode()
    assert "chat number 2" in first and "chat number 1" in first and "chat number 0" not in first
    assert f'href="/?before={ids[1]}">Older</a>' in first
    older = browser.get(f"/?before={ids[1]}").data.decode()
    assert "chat number 0" in older and "chat number 1" not in older and "Older</a>" not in older
    assert "queued" in older and TEXT_ALIAS in older and TEXT_MODEL not in older


def test_pages_and_files_are_served_with_a_strict_policy(browser, client):
    for response in (browser.get("/"), client.get("/signin"), browser.get("/sessions/12345"),
                     browser.get("/assets/helix.js")):
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" not in browser.get("/healthz").headers  # the JSON API is left as it was


def test_a_message_shows_only_its_params_that_differ_from_the_defaults_folded_away(browser):
    session_id = session_id_of(new_chat(browser, "Hi", max_new_tokens="256", temperature="0.5", seed="7"))

    page = browser.get(f"/sessions/{session_id}").data.decode()
    shown = page.split('<details class="params">')[1].split("</details>")[0]
    assert "<summary>2 params changed from the defaults</summary>" in shown
    assert "<dt>temperature</dt><dd>0.5</dd>" in shown and "<dt>seed</dt><dd>7</dd>" in shown
    assert "max_new_tokens" not in shown  # 256 is what a runner uses anyway
