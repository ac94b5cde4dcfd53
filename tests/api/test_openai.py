"""The OpenAI-compatible API under /v1, through the Flask test client, with the runner's side played here.

A request that waits for its reply runs in this thread while a `FakeRunner` in another claims and
answers the task through the worker API, as a real runner would.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select

from helix_api.models import Creator, Interaction, Session, Task, TaskStatus
from tests.api.test_finetune import chats, png, start_finetune
from tests.conftest import IMAGE_ALIAS, IMAGE_MODEL, TEXT_ALIAS, TEXT_MODEL, claim

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Say hello"}]
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


class FakeRunner:
    """The runner's side of the worker API, on its own test client (it runs in another thread)."""

    def __init__(self, app, headers: dict[str, str]) -> None:
        self.client = app.test_client()
        self.headers = headers

    def claim(self, model: str = TEXT_MODEL, type_: str = "text", mode: str = "create") -> tuple[dict, str]:
        response = claim(self.client, self.headers, model=model, type=type_, mode=mode, wait=10)
        assert response.status_code == 200, response.data
        return response.json["task"], response.json["lease"]["token"]

    def post(self, task: dict, action: str, **body: Any):
        response = self.client.post(f"/api/v1/worker/task/{task['id']}/{action}", headers=self.headers, json=body)
        assert response.status_code == 200, response.json
        return response

    def tokens(self, task: dict, token: str, *texts: str) -> None:
        """Post each text as its own event, in its own request (seq from 1, as each attempt does)."""
        for seq, text in enumerate(texts, start=1):
            self.post(task, "events", lease_token=token, events=[{"seq": seq, "kind": "token", "text": text}])

    def answer(self, *texts: str, finish_reason: str = "stop") -> dict:
        """Claim the next text task and stream `texts` as its reply; returns the task."""
        task, token = self.claim()
        self.tokens(task, token, *texts)
        self.post(task, "complete", lease_token=token,
                  result={"text": "".join(texts), "finish_reason": finish_reason, "usage": USAGE})
        return task

    def upload(self, task: dict, token: str, data: bytes, kind: str, name: str) -> dict:
        response = self.client.post(f"/api/v1/worker/task/{task['id']}/files", headers=self.headers,
                                    content_type="multipart/form-data",
                                    data={"lease_token": token, "kind": kind, "file": (io.BytesIO(data), name)})
        assert response.status_code == 201, response.json
        return response.json["file"]


@contextmanager
def in_background(work: Callable[[], Any]) -> Iterator[dict[str, Any]]:
    """Run `work` in a thread for the duration of the block; its result in `["result"]`, its error raised."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield outcome
    thread.join(20)
    assert not thread.is_alive(), "the fake runner did not finish"
    if "error" in outcome:
        raise outcome["error"]


@pytest.fixture
def fake(app, runner) -> FakeRunner:
    """A fake runner on the test app."""
    return FakeRunner(app, runner)


def sse(data: bytes) -> list[Any]:
    """The `data:` payloads of a Server-Sent Events body: JSON objects, or the string `[DONE]`."""
    payloads = []
    for line in data.decode().splitlines():
        if line.startswith("data: "):
            raw = line[len("data: "):]
            payloads.append(raw if raw == "[DONE]" else json.loads(raw))
    return payloads


def contents(chunks: list[Any]) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks
            if isinstance(c, dict) and c.get("choices") and "content" in c["choices"][0]["delta"]]


def only_task(db) -> Task:
    with db.orm_read() as s:
        [task] = s.scalars(select(Task)).all()
        return task


def finetuned(client, headers, fake: FakeRunner, type_: str = "text", model: str = TEXT_MODEL) -> tuple[int, int]:
    """A completed fine-tune session of the user's: (session id, adapter file id)."""
    data = [("data.jsonl", chats(12))] if type_ == "text" else [(f"{c}.png", png(colour=c)) for c in
                                                                 ("red", "blue", "green")] + \
        [(f"{c}.txt", f"a {c} square".encode()) for c in ("red", "blue", "green")]
    created = start_finetune(client, headers, data, type_=type_, model=model)
    assert created.status_code == 201, created.json
    task, token = fake.claim(model=model, type_=type_, mode="finetune")
    adapter = fake.upload(task, token, b"PK\x05\x06" + b"\x00" * 18, "adapter", "adapter.zip")
    fake.post(task, "complete", lease_token=token, result={"text": "trained", "adapter_file_id": adapter["id"]})
    return created.json["id"], adapter["id"]


# Chat, not streamed.


def test_a_chat_completion_answers_with_the_runners_text_and_usage(client, user, fake):
    with in_background(lambda: fake.answer("Hel", "lo!")) as served:
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, "max_tokens": 8})
    assert response.status_code == 200, response.json
    body = response.json
    assert body["id"] == f"chatcmpl-{served['result']['id']}" and body["object"] == "chat.completion"
    assert body["model"] == TEXT_MODEL and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == USAGE


def test_the_messages_are_stored_as_a_session_whose_task_gets_the_whole_list(client, user, fake, db):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
                {"role": "user", "content": "Name a colour."}]
    with in_background(lambda: fake.answer("Blue.")):
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": messages, "seed": 4,
                                                         "temperature": 0.5, "stop": "\n"})
    assert response.status_code == 200, response.json
    task = only_task(db)
    assert task.input["messages"] == [{**m, "content": "Hello."} if m["role"] == "assistant" else m for m in messages]
    assert task.params == {"seed": 4, "temperature": 0.5, "stop": "\n"}
    assert response.headers["X-Helix-Session-Id"] == str(task.session_id)
    with db.orm_read() as s:
        session = s.get(Session, task.session_id)
        turns = [(i.creator, i.message, i.output, i.state.value, i.task is not None) for i in session.interactions]
    assert session.model_name == TEXT_MODEL and session.mode.value == "create" and session.type.value == "text"
    assert turns == [(Creator.USER, "Hi", "", "complete", False), (Creator.ASSISTANT, "", "Hello.", "complete", False),
                     (Creator.USER, "Name a colour.", "", "complete", False),
                     (Creator.ASSISTANT, "", "Blue.", "complete", True)]


def test_a_missing_temperature_samples_at_openais_default_of_1(client, user, fake, db):
    with in_background(lambda: fake.answer("ok")):
        client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, "max_completion_tokens": 3})
    assert only_task(db).params == {"temperature": 1.0, "max_new_tokens": 3}


def test_neutral_values_of_unsupported_fields_are_accepted(client, user, fake):
    neutral = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "logit_bias": {},
               "tools": [], "response_format": {"type": "text"}, "user": "someone", "store": False,
               "parallel_tool_calls": True, "stream": False}
    with in_background(lambda: fake.answer("ok")):
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, **neutral})
    assert response.status_code == 200, response.json


@pytest.mark.parametrize("change,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -3}, "seed"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"n": 2}, "n"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"colour": "blue"}, "colour"),
    ({"model": 7}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [*HELLO, {"role": "assistant", "content": "Hi"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
])
def test_a_bad_request_is_an_openai_400_naming_the_field(client, user, db, change, param):
    response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, **change})
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert param.split("[")[0] in error["message"]
    with db.orm_read() as s:
        assert s.scalars(select(Task)).all() == []


def test_a_failed_task_is_a_500_server_error_with_its_error_that_clients_do_not_retry(client, user, fake):
    def fail() -> None:
        task, token = fake.claim()
        fake.post(task, "fail", lease_token=token, error="CUDA out of memory", retry=False)

    with in_background(fail):
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO})
    assert response.status_code == 500
    assert response.json["error"]["type"] == "server_error" and response.json["error"]["code"] == "task_failed"
    assert "CUDA out of memory" in response.json["error"]["message"]
    assert response.headers["x-should-retry"] == "false"


def test_a_task_cancelled_meanwhile_is_an_error(client, user, fake):
    def cancel() -> None:
        task, _ = fake.claim()
        assert fake.client.post(f"/api/v1/sessions/{task['session_id']}/cancel", headers=user).status_code == 200

    with in_background(cancel):
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO})
    assert response.status_code == 409 and response.json["error"]["code"] == "task_cancelled"


def test_no_reply_in_time_is_a_504_and_the_task_is_cancelled(make_client, user, db):
    response = make_client(OPENAI_WAIT_SECONDS=0.3).post(CHAT, headers=user,
                                                          json={"model": TEXT_MODEL, "messages": HELLO})
    assert response.status_code == 504 and response.json["error"]["type"] == "server_error"
    assert response.json["error"]["code"] == "timeout"
    assert only_task(db).status == TaskStatus.CANCELLED


# Errors and auth.


@pytest.mark.parametrize("headers,status,type_,code", [
    ({}, 401, "invalid_request_error", "invalid_api_key"),
    ({"Authorization": "Bearer hx_nope"}, 401, "invalid_request_error", "invalid_api_key"),
    ("runner", 403, "permission_error", "forbidden"),
])
def test_auth_errors_are_openai_shaped(client, runner, headers, status, type_, code):
    headers = runner if headers == "runner" else headers
    for response in (client.get("/v1/models", headers=headers),
                     client.post(CHAT, headers=headers, json={"model": TEXT_MODEL, "messages": HELLO})):
        assert response.status_code == status
        assert response.json["error"]["type"] == type_ and response.json["error"]["code"] == code
        assert response.json["error"]["message"]


def test_unknown_routes_wrong_methods_and_big_bodies_are_openai_shaped_under_v1_only(client, make_client, user):
    missing = client.get("/v1/assistants", headers=user)
    assert missing.status_code == 404 and missing.json["error"]["type"] == "invalid_request_error"
    assert "/v1/assistants" in missing.json["error"]["message"]
    wrong = client.get(CHAT, headers=user)
    assert wrong.status_code == 405 and wrong.json["error"]["code"] == "method_not_allowed"
    big = make_client(MAX_CONTENT_LENGTH=200).post(CHAT, headers=user, json={
        "model": TEXT_MODEL, "messages": [{"role": "user", "content": "x" * 500}]})
    assert big.status_code == 413 and big.json["error"]["code"] == "too_large"
    native = client.get("/api/v1/nothing-here", headers=user)
    assert native.status_code == 404 and native.json["error"] == "not_found"


def test_an_unknown_model_is_404_model_not_found(client, user):
    response = client.post(CHAT, headers=user, json={"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 404
    assert response.json["error"]["code"] == "model_not_found" and response.json["error"]["param"] == "model"
    assert "gpt-4o" in response.json["error"]["message"]
    assert client.post(CHAT, headers=user, json={"model": IMAGE_MODEL, "messages": HELLO}).status_code == 404
    assert client.get("/v1/models/gpt-4o", headers=user).json["error"]["code"] == "model_not_found"


# Models and fine-tunes.


def test_models_lists_configured_and_served_models_and_only_the_callers_fine_tunes(client, user, make_user, fake):
    bob = make_user("bob")
    mine, _ = finetuned(client, user, fake)
    finetuned(client, bob, fake)
    served = f"local/served-{uuid.uuid4().hex[:6]}"
    assert claim(client, {**fake.headers, "X-Helix-Runner": f"r-{uuid.uuid4().hex}"}, model=served).status_code == 204

    response = client.get("/v1/models", headers=user)
    assert response.status_code == 200 and response.json["object"] == "list"
    by_id = {m["id"]: m for m in response.json["data"]}
    # Configured models are listed by their aliases, fine-tunes by their base model's.
    assert by_id[TEXT_ALIAS]["helix_type"] == "text" and by_id[IMAGE_ALIAS]["helix_type"] == "image"
    assert TEXT_MODEL not in by_id and IMAGE_MODEL not in by_id
    assert by_id[served]["helix_served"] is True and by_id[TEXT_ALIAS]["helix_served"] is False
    ft = [m for m in response.json["data"] if m["id"].startswith("ft:")]
    assert [m["id"] for m in ft] == [f"ft:{TEXT_ALIAS}:{mine}"]
    assert ft[0]["owned_by"] == "alice" and ft[0]["object"] == "model" and isinstance(ft[0]["created"], int)
    assert client.get(f"/v1/models/ft:{TEXT_ALIAS}:{mine}", headers=user).json["id"] == ft[0]["id"]
    assert client.get(f"/v1/models/ft:{TEXT_MODEL}:{mine}", headers=user).json["id"] == ft[0]["id"]
    assert client.get(f"/v1/models/ft:{TEXT_ALIAS}:{mine}", headers=bob).status_code == 404
    assert client.get(f"/v1/models/{TEXT_MODEL}", headers=bob).json["id"] == TEXT_ALIAS
    assert client.get(f"/v1/models/{TEXT_ALIAS}", headers=bob).json["owned_by"] == "helix"


def test_a_fine_tune_model_id_answers_with_its_base_model_and_adapter(client, user, make_user, fake, db):
    session_id, adapter_id = finetuned(client, user, fake)
    model = f"ft:{TEXT_MODEL}:{session_id}"
    with in_background(lambda: fake.answer("tuned")):
        response = client.post(CHAT, headers=user, json={"model": model, "messages": HELLO})
    assert response.status_code == 200, response.json
    assert response.json["model"] == model
    with db.orm_read() as s:
        task = s.scalars(select(Task).where(Task.session_id != session_id)).one()
    assert task.model_name == TEXT_MODEL and task.input["adapter"]["id"] == adapter_id

    for other, who in ((model, make_user("bob")), (f"ft:{TEXT_MODEL}:999", user),
                       (f"ft:other/model:{session_id}", user), (f"ft:{TEXT_MODEL}:x", user),
                       (f"ft:{TEXT_MODEL}:{'9' * 40}", user)):
        refused = client.post(CHAT, headers=who, json={"model": other, "messages": HELLO})
        assert refused.status_code == 404 and refused.json["error"]["code"] == "model_not_found", other


# Chat, streamed.


def test_a_stream_is_openai_chunks_ending_in_usage_and_done(client, user, fake):
    with in_background(lambda: fake.answer("Hel", "lo", "!", finish_reason="length")) as served:
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, "stream": True,
                                                         "stream_options": {"include_usage": True}})
        data = response.get_data()
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    chunks = sse(data)
    assert chunks[-1] == "[DONE]"
    first, *middle, finish, usage, _ = chunks
    task_id = served["result"]["id"]
    for chunk in (first, *middle, finish, usage):
        assert chunk["id"] == f"chatcmpl-{task_id}" and chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == TEXT_MODEL
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # Tokens that arrive together travel together: the text is what matters, not where it splits.
    assert "".join(contents(middle)) == "Hello!" and all(contents(middle))
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == USAGE


def test_a_requeue_mid_stream_sends_the_text_once(client, user, fake, db):
    def lose_then_answer() -> None:
        task, token = fake.claim()
        fake.tokens(task, token, "Hel", "lo")
        fake.post(task, "fail", lease_token=token, error="runner lost", retry=True)
        fake.answer("He", "llo w", "orld")

    with in_background(lose_then_answer):
        data = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO,
                                                     "stream": True}).get_data()
    chunks = sse(data)
    parts = contents(chunks)
    assert parts[0] == "" and "".join(parts) == "Hello world" and all(parts[1:])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1] == "[DONE]"
    assert only_task(db).attempt == 2


def test_a_retry_that_says_something_else_ends_the_stream_with_an_error(client, user, fake, db):
    response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, "stream": True},
                           buffered=False)
    body = iter(response.response)
    data = next(body)  # the role: the task is queued
    task, token = fake.claim()
    fake.tokens(task, token, "Hello")
    while b"Hello" not in data:  # the client has the first attempt's text before it is lost
        data += next(body)
    fake.post(task, "fail", lease_token=token, error="runner lost", retry=True)
    task, token = fake.claim()
    fake.tokens(task, token, "Goodbye")
    chunks = sse(data + b"".join(body))
    assert contents(chunks) == ["", "Hello"]
    assert chunks[-1]["error"]["type"] == "server_error" and chunks[-1]["error"]["code"] == "retry_diverged"
    assert only_task(db).status == TaskStatus.CANCELLED


def test_a_failed_task_ends_the_stream_with_an_error_chunk(client, user, fake):
    def fail() -> None:
        task, token = fake.claim()
        fake.tokens(task, token, "Hi")
        fake.post(task, "fail", lease_token=token, error="the GPU fell off", retry=False)

    with in_background(fail):
        data = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO,
                                                     "stream": True}).get_data()
    chunks = sse(data)
    assert contents(chunks) == ["", "Hi"] and "[DONE]" not in chunks
    assert chunks[-1]["error"]["code"] == "task_failed" and "the GPU fell off" in chunks[-1]["error"]["message"]


def test_a_client_that_closes_its_stream_cancels_the_task(client, user, db):
    response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, "stream": True},
                           buffered=False)
    first = next(iter(response.response))
    assert b'"role": "assistant"' in first
    assert only_task(db).status == TaskStatus.QUEUED
    response.close()
    assert only_task(db).status == TaskStatus.CANCELLED


# Images.


def answer_image(fake: FakeRunner, *images: bytes) -> dict:
    task, token = fake.claim(model=IMAGE_MODEL, type_="image")
    ids = [fake.upload(task, token, data, "output", f"{n}.png")["id"] for n, data in enumerate(images)]
    fake.post(task, "complete", lease_token=token, result={"text": "", "files": ids})
    return task


def test_images_come_back_as_base64_with_size_and_n_mapped_to_params(client, user, fake, db):
    red, blue = png(64, 96, "red"), png(64, 96, "blue")
    with in_background(lambda: answer_image(fake, red, blue)):
        response = client.post("/v1/images/generations", headers=user, json={
            "prompt": "two squares", "n": 2, "size": "64x96", "response_format": "b64_json", "seed": 3})
    assert response.status_code == 200, response.json
    assert [base64.b64decode(d["b64_json"]) for d in response.json["data"]] == [red, blue]
    assert isinstance(response.json["created"], int)
    task = only_task(db)
    assert task.model_name == IMAGE_MODEL and task.input["prompt"] == "two squares"
    assert task.params == {"num_images": 2, "seed": 3, "width": 64, "height": 96}


def test_an_image_url_works_without_a_key_until_it_expires_or_is_tampered_with(client, make_client, user, fake):
    image = png(64, 64)
    with in_background(lambda: answer_image(fake, image)):
        response = client.post("/v1/images/generations", headers=user, json={"prompt": "a square"})
    [item] = response.json["data"]
    url = item["url"]
    assert url.startswith("http://localhost/v1/files/")
    fetched = client.get(url)
    assert fetched.status_code == 200 and fetched.data == image and fetched.mimetype == "image/png"

    path, _, token = url.partition("?token=")
    other_id = int(path.split("/")[-2]) + 1
    for bad in (f"{path}?token={token[:-2]}xx", f"{path}?token=", path,
                f"/v1/files/{other_id}/content?token={token}"):
        refused = client.get(bad)
        assert refused.status_code == 403 and refused.json["error"]["type"] == "permission_error", bad
    expired = make_client(IMAGE_URL_SECONDS=-1).get(url)
    assert expired.status_code == 403 and "expired" in expired.json["error"]["message"]


@pytest.mark.parametrize("change,param", [
    ({"size": "big"}, "size"), ({"size": "10x10"}, "size"), ({"n": 9}, "n"), ({"response_format": "png"},
                                                                              "response_format"),
    ({"prompt": " "}, "prompt"), ({"model": TEXT_MODEL}, "model"), ({"style": "vivid"}, "style"),
])
def test_a_bad_image_request_names_the_openai_field(client, user, change, param):
    response = client.post("/v1/images/generations", headers=user, json={"prompt": "a fox", **change})
    assert response.status_code in (400, 404), response.json
    assert response.json["error"]["param"] == param


def test_an_image_fine_tune_id_draws_with_its_adapter(client, user, fake, db):
    session_id, adapter_id = finetuned(client, user, fake, type_="image", model=IMAGE_MODEL)
    with in_background(lambda: answer_image(fake, png())):
        response = client.post("/v1/images/generations", headers=user, json={
            "prompt": "a square", "model": f"ft:{IMAGE_MODEL}:{session_id}", "response_format": "b64_json"})
    assert response.status_code == 200, response.json
    with db.orm_read() as s:
        task = s.scalars(select(Task).where(Task.session_id != session_id)).one()
        assert s.scalars(select(Interaction).where(Interaction.session_id == task.session_id)).all()
    assert task.model_name == IMAGE_MODEL and task.input["adapter"]["id"] == adapter_id
