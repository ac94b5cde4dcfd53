"""Each class of odd input that once gave a 500 (issue 14's table), with its example: now a 4xx naming what is
wrong, and nothing stored. On SQLite and PostgreSQL alike (PostgreSQL is the stricter: no NUL, no NaN)."""

from __future__ import annotations

import io
import json
import math
import struct
import uuid
import zlib

import pytest
from sqlalchemy import func, select

from helix_api.accounts.auth import create_user
from helix_api.models import File, Interaction, Runner, Session, Task, TaskEvent
from helix_api.web.signin import safe_next
from tests.api.test_finetune import chats, png, start_finetune
from tests.conftest import IMAGE_MODEL, TEXT_MODEL, claim
from tests.web.conftest import sign_in, submit

_TABLES = (Session, Interaction, Task, TaskEvent, File, Runner)
CHAT = "/v1/chat/completions"


def _rows(db) -> tuple[int, ...]:
    with db.orm_read() as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) for m in _TABLES)


def _post_raw(client, path: str, body: dict, headers: dict[str, str]):
    """POST `body` as Python's json writes it: NaN and Infinity as literals, a lone surrogate as its escape."""
    return client.post(path, data=json.dumps(body), headers={**headers, "Content-Type": "application/json"})


@pytest.fixture
def make_key(db):
    """Create a user; returns their API key."""
    def make() -> str:
        with db.orm_write() as session:
            return create_user(session, f"user-{uuid.uuid4().hex[:8]}")[1]
    return make


def _refused(response, field: str | None = None, status: int = 400) -> dict:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:500])
    body = response.json
    if field is not None:
        error = body["error"]
        named = error["param"] if isinstance(error, dict) else body["field"]
        assert named == field, body
    return body


@pytest.fixture
def claimed(client, runner, task_factory):
    """A text task claimed by the runner: (task, lease token)."""
    task_factory()
    body = claim(client, runner).json
    return body["task"], body["lease"]["token"]


# NUL in text.

@pytest.mark.parametrize("raw,field", [
    ({"model_name": TEXT_MODEL, "message": "a\x00b"}, "message"),
    ({"model_name": TEXT_MODEL, "message": "hi", "name": "a\x00"}, "name"),
    ({"model_name": TEXT_MODEL, "message": "hi", "params": {"stop": "a\x00"}}, "params.stop"),
])
def test_nul_in_a_session_is_400(client, user, db, raw, field):
    before = _rows(db)
    body = _refused(_post_raw(client, "/api/v1/sessions", raw, user), field)
    assert "NUL" in body["message"]
    assert _rows(db) == before


def test_nul_in_v1_content_is_an_openai_400(client, user, db):
    before = _rows(db)
    raw = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "a\x00b"}]}
    body = _refused(_post_raw(client, CHAT, raw, user), "messages[0].content")
    assert body["error"]["type"] == "invalid_request_error"
    assert _rows(db) == before


@pytest.mark.parametrize("endpoint,raw,field", [
    ("events", {"events": [{"seq": 1, "kind": "token", "text": "a\x00"}]}, "events[0].text"),
    ("fail", {"error": "boom\x00"}, "error"),
    ("complete", {"result": {"text": "a\x00"}}, "result.text"),
])
def test_nul_from_a_runner_is_400(client, runner, db, claimed, endpoint, raw, field):
    task, token = claimed
    before = _rows(db)
    _refused(_post_raw(client, f"/api/v1/worker/task/{task['id']}/{endpoint}", {"lease_token": token, **raw},
                       runner), field)
    assert _rows(db) == before


def test_nul_in_the_claims_model_name_is_400(client, runner, db):
    before = _rows(db)
    response = client.get("/api/v1/worker/task?mode=create&type=text&model_name=a%00b", headers=runner)
    _refused(response, "model_name")
    assert _rows(db) == before


# NaN and infinities.

@pytest.mark.parametrize("type_,model,param,value", [
    ("text", TEXT_MODEL, "temperature", math.nan),
    ("text", TEXT_MODEL, "top_p", math.inf),
    ("image", IMAGE_MODEL, "guidance_scale", -math.inf),
])
def test_nan_in_params_is_400_naming_the_param(client, user, db, type_, model, param, value):
    before = _rows(db)
    raw = {"type": type_, "model_name": model, "message": "hi", "params": {param: value}}
    body = _refused(_post_raw(client, "/api/v1/sessions", raw, user), f"params.{param}")
    assert param in body["message"] and "NaN or an infinity" in body["message"]
    assert _rows(db) == before


def test_nan_learning_rate_of_a_finetune_is_400(client, user, db):
    before = _rows(db)
    response = client.post("/api/v1/sessions", headers=user, content_type="multipart/form-data", data={
        "mode": "finetune", "type": "text", "model_name": TEXT_MODEL, "params": '{"learning_rate": NaN}',
        "files": [(io.BytesIO(chats(12)), "chats.jsonl")]})
    _refused(response, "params.learning_rate")
    assert _rows(db) == before


def test_nan_temperature_in_the_web_form_is_shown_next_to_the_field(app, make_key, db):
    browser = app.test_client()
    sign_in(browser, make_key())
    before = _rows(db)
    response = submit(browser, "/new/chat", {"model_name": TEXT_MODEL, "message": "hi", "temperature": "nan"})
    assert response.status_code == 400 and "Temperature" in response.get_data(as_text=True)
    assert _rows(db) == before


def test_nan_in_v1_temperature_is_an_openai_400(client, user, db):
    raw = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": math.nan}
    _refused(_post_raw(client, CHAT, raw, user), "temperature")


@pytest.mark.parametrize("endpoint,raw,field", [
    ("complete", {"result": {"text": "x", "loss": math.nan}}, "result.loss"),
    ("events", {"events": [{"seq": 1, "kind": "progress", "step": math.nan}]}, "events[0].step"),
    ("events", {"events": [{"seq": 1, "kind": "progress", "loss": math.inf}]}, "events[0].loss"),
])
def test_nan_from_a_runner_is_400(client, runner, db, claimed, endpoint, raw, field):
    task, token = claimed
    before = _rows(db)
    _refused(_post_raw(client, f"/api/v1/worker/task/{task['id']}/{endpoint}", {"lease_token": token, **raw},
                       runner), field)
    assert _rows(db) == before


# Integers beyond the column.

@pytest.mark.parametrize("method,path", [
    ("get", "/api/v1/sessions/2147483648"),
    ("get", "/api/v1/sessions/99999999999999999999/files"),
    ("post", "/api/v1/sessions/2147483648/messages"),
    ("get", "/api/v1/sessions/1/files/2147483648"),
    ("post", "/api/v1/worker/task/2147483648/heartbeat"),
    ("get", "/v1/files/9223372036854775808/content?token=x"),
])
def test_an_id_beyond_the_column_is_404(client, user, runner, method, path):
    headers = runner if "/worker/" in path else user
    response = getattr(client, method)(path, headers=headers, json={"message": "hi", "lease_token": "x"})
    assert response.status_code == 404


def test_an_event_seq_beyond_the_column_is_400(client, runner, db, claimed):
    task, token = claimed
    before = _rows(db)
    response = client.post(f"/api/v1/worker/task/{task['id']}/events", headers=runner,
                           json={"lease_token": token, "events": [{"seq": 2**31, "kind": "token", "text": "x"}]})
    _refused(response, "events[0].seq")
    assert _rows(db) == before


@pytest.mark.parametrize("before", [2**31, 2**62, 2**63, 10**30])
def test_a_page_cursor_beyond_the_column_is_400(client, user, before):
    _refused(client.get(f"/api/v1/sessions?before={before}", headers=user), "before")


@pytest.mark.parametrize("cursor", ["2147483648", "9223372036854775808", "²", "1e3", "-1"])
def test_an_odd_last_event_id_is_400_before_the_stream_starts(client, user, task_factory, cursor):
    session = task_factory()
    response = client.get(f"/api/v1/sessions/{session['id']}/events?follow=0",
                          headers={**user, "Last-Event-ID": cursor})
    _refused(response, "Last-Event-ID")


def test_a_good_last_event_id_still_resumes(client, user, task_factory):
    session = task_factory()
    response = client.get(f"/api/v1/sessions/{session['id']}/events?follow=0", headers={**user, "Last-Event-ID": "0"})
    assert response.status_code == 200 and b"id: 1" in response.data


def test_a_web_page_cursor_beyond_the_column_shows_the_first_page(app, make_key):
    browser = app.test_client()
    sign_in(browser, make_key())
    assert browser.get(f"/?before={2**40}").status_code == 200


# Lone surrogates.

def test_a_lone_surrogate_in_a_message_is_400(client, user, db):
    before = _rows(db)
    raw = {"model_name": TEXT_MODEL, "message": "x\ud800"}
    body = _refused(_post_raw(client, "/api/v1/sessions", raw, user))
    assert "not valid JSON" in body["message"] and "escape" in body["message"]
    assert _rows(db) == before


def test_a_lone_surrogate_in_v1_is_an_openai_400(client, user, db):
    raw = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "x\udc00"}]}
    body = _refused(_post_raw(client, CHAT, raw, user))
    assert body["error"]["type"] == "invalid_request_error"


def test_a_lone_surrogate_in_a_runners_error_is_400(client, runner, db, claimed):
    task, token = claimed
    _refused(_post_raw(client, f"/api/v1/worker/task/{task['id']}/fail",
                       {"lease_token": token, "error": "boom \ud800"}, runner))
    with db.orm_read() as s:
        assert s.get(Task, task["id"]).error is None


def test_a_lone_surrogate_in_a_training_line_names_the_line(client, user, db):
    before = _rows(db)
    lines = chats(12) + b'{"question": "x\\ud800", "answer": "y"}\n'
    body = _refused(start_finetune(client, user, [("chats.jsonl", lines)]))
    assert body["error"] == "invalid_training_data"
    assert body["problems"] == [{"file": "chats.jsonl", "line": 13, "message": body["problems"][0]["message"]}]
    assert "surrogate" in body["problems"][0]["message"]
    assert _rows(db) == before


# Deep nesting.

@pytest.mark.parametrize("path", ["/api/v1/sessions", CHAT])
def test_deeply_nested_json_is_400(client, user, db, path):
    before = _rows(db)
    response = client.post(path, data=b"[" * 100_000, headers={**user, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert _rows(db) == before


def test_json_nested_beyond_the_depth_in_a_result_is_400(client, runner, claimed):
    task, token = claimed
    deep: object = "x"
    for _ in range(40):
        deep = [deep]
    response = client.post(f"/api/v1/worker/task/{task['id']}/complete", headers=runner,
                           json={"lease_token": token, "result": {"text": "x", "deep": deep}})
    assert "deeper" in _refused(response)["message"]


# Decompression bomb.

def _bomb(width: int = 65535, height: int = 65535) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_400_naming_the_file(client, user, db, settings):
    before = _rows(db)
    files = [("bomb.png", _bomb()), ("bomb.txt", b"a bomb"),
             *[(f"ok{i}.png", png()) for i in range(3)], *[(f"ok{i}.txt", b"fine") for i in range(3)]]
    body = _refused(start_finetune(client, user, files, type_="image", model=IMAGE_MODEL))
    assert body["error"] == "invalid_training_data" and "bomb.png" in body["message"]
    assert body["problems"][0]["file"] == "bomb.png" and "pixels" in body["problems"][0]["message"]
    assert _rows(db) == before


# Strings beyond the column.

def test_a_model_name_beyond_the_column_is_400_and_no_runner_is_recorded(client, runner, db):
    before = _rows(db)
    response = client.get("/api/v1/worker/task", query_string={"model_name": "m" * 501}, headers=runner)
    _refused(response, "model_name")
    assert _rows(db) == before


def test_a_session_name_beyond_the_column_is_400(client, user, db):
    response = client.post("/api/v1/sessions", headers=user,
                           json={"model_name": TEXT_MODEL, "message": "hi", "name": "n" * 201})
    assert "200" in _refused(response, "name")["message"]


# CR/LF in a redirect.

@pytest.mark.parametrize("target", ["/\r\nX-Injected: 1", "/sessions\n", "/a\tb", "/\x00", "/\x7f"])
def test_sign_in_next_with_control_characters_goes_home(app, client, make_key, target):
    with app.test_request_context():
        assert safe_next(target) == "/"
    response = sign_in(client, make_key(), next_path=target)
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert "X-Injected" not in response.headers


def test_sign_in_next_on_this_site_is_kept(client, make_key):
    response = sign_in(client, make_key(), next_path="/sessions/3?x=café")
    assert response.status_code == 302 and response.headers["Location"].startswith("/sessions/3")


def test_unknown_fields_are_still_refused_by_name(client, user):
    body = _refused(client.post("/api/v1/sessions", headers=user,
                                json={"model_name": TEXT_MODEL, "message": "hi", "colour": "blue"}), "colour")
    assert "Unknown field 'colour'" in body["message"]


def test_json_body_errors_never_echo_a_huge_body(client, user):
    response = client.post("/api/v1/sessions", headers=user, data=json.dumps({"message": ["x" * 100_000]}),
                           content_type="application/json")
    assert response.status_code == 400 and len(response.get_data()) < 2000
