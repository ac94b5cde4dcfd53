"""Structured output and tool calls (helix_api/constraints.py, openai/completions.py, sessions/tool_calls.py):
every bad input is a 400 naming its field with nothing stored; good ones are stored as task params; a
runner's tool calls and log probabilities come back in OpenAI's shapes, streamed or not, and in SQL."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel
from sqlalchemy import func, select

from helix_api.models import Creator, Interaction, Task, ToolCall
from tests.api.test_openai import CHAT, HELLO, USAGE, FakeRunner, in_background, sse
from tests.conftest import TEXT_MODEL

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
CALL = {"id": "call_1_0", "name": "get_weather", "arguments": '{"city": "Paris"}'}
LOGPROBS = [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
             "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                              {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]}]


@pytest.fixture
def fake(app, runner) -> FakeRunner:
    """A fake runner on the test app."""
    return FakeRunner(app, runner)


def complete(fake: FakeRunner, result: dict[str, Any], *tokens: str) -> dict:
    """Claim the next text task, stream `tokens`, complete it with `result` (usage added); returns the task."""
    task, token = fake.claim()
    fake.tokens(task, token, *tokens)
    fake.post(task, "complete", lease_token=token, result={"usage": USAGE, **result})
    return task


def count(db, model: Any) -> int:
    with db.orm_read() as s:
        return s.scalar(select(func.count()).select_from(model))


def start(client, user, params: dict[str, Any]):
    return client.post("/api/v1/sessions", headers=user, json={"model_name": TEXT_MODEL, "message": "hi",
                                                                "params": params})


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


def bomb(levels: int = 40) -> dict[str, Any]:
    """$defs each referencing the next twice: 2**levels paths if a compiler expanded references."""
    defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"},
                                                       "b": {"$ref": f"#/$defs/d{i + 1}"}},
                      "required": ["a", "b"], "additionalProperties": False} for i in range(levels)}
    return {"$defs": {**defs, f"d{levels}": {"type": "string"}}, "$ref": "#/$defs/d0"}


def with_schema(schema: Any) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


def with_tool(function: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"tools": [{"type": "function", "function": function}], **more}


BAD = [
    (with_schema({"type": "strin"}), "response_format.json_schema.schema"),  # not JSON Schema
    (with_schema({"type": "array", "uniqueItems": True}), "response_format.json_schema.schema"),  # unsupported
    (with_schema({"type": "string", "pattern": "^(?=a)a+$"}), "response_format.json_schema.schema"),  # look-ahead
    (with_schema({"type": "string", "format": "colour"}), "response_format.json_schema.schema"),
    (with_schema({"$ref": "#/$defs/missing"}), "response_format.json_schema.schema"),
    (with_schema({"enum": ["x" * 1000] * 70}), "response_format.json_schema.schema"),  # over 65536 bytes
    (with_schema(True), "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": WEATHER}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ({"response_format": "json"}, "response_format"),
    (with_tool({"description": "no name"}), "tools[0].function.name"),
    (with_tool({"name": "get weather"}), "tools[0].function.name"),
    (with_tool({"name": "x" * 65}), "tools[0].function.name"),
    ({"tools": [TOOL, TOOL]}, "tools[1].function.name"),
    ({"tools": [{"type": "retrieval", "function": TOOL["function"]}]}, "tools[0].type"),
    (with_tool({"name": "f", "parameters": {"type": "array", "uniqueItems": True}}), "tools[0].function.parameters"),
    (with_tool({"name": "f", "parameters": {"type": "string"}}), "tools[0].function.parameters"),
    # Arguments are an object, said at the schema's top: an anyOf of strings would let a model write others.
    (with_tool({"name": "f", "parameters": {"anyOf": [{"type": "string"}]}}), "tools[0].function.parameters"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
]


@pytest.mark.parametrize("params,where", BAD)
def test_bad_structured_input_is_a_400_naming_the_field_with_nothing_queued(client, user, db, params, where):
    before = count(db, Task)
    native = start(client, user, params)
    assert native.status_code == 400, native.json
    assert native.json["error"] == "invalid_field" and native.json["field"] == f"params.{where}"
    assert repr(where) in native.json["message"]
    v1 = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, **params})
    assert v1.status_code == 400, v1.json
    assert v1.json["error"]["type"] == "invalid_request_error" and v1.json["error"]["param"] == where
    assert count(db, Task) == before == 0


def test_a_schema_nested_past_what_any_json_may_be_is_refused_naming_where(client, user, db):
    # Free-form JSON of any request is capped at 32 levels (schemas/base.py), which a schema 41 deep meets first.
    for response, field in ((start(client, user, with_schema(nested(40))), "params.response_format.json_schema.schema"),
                            (client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO,
                                                                   **with_schema(nested(40))}),
                             "response_format.json_schema.schema")):
        assert response.status_code == 400
        error = response.json.get("field") or response.json["error"]["param"]
        assert error.startswith(field), response.json
    assert count(db, Task) == 0


def test_the_schema_caps_come_from_settings(make_client, user):
    client = make_client(MAX_SCHEMA_BYTES=200, MAX_SCHEMA_DEPTH=4)
    assert start(client, user, with_schema({"enum": ["x" * 50] * 3})).status_code == 201  # 168 bytes
    assert start(client, user, with_schema(nested(3))).status_code == 201  # 4 levels
    deep = start(client, user, with_schema(nested(4)))
    assert deep.status_code == 400 and "HELIX_MAX_SCHEMA_DEPTH" in deep.json["message"]
    big = start(client, user, with_schema({"enum": ["x" * 100] * 3}))
    assert big.status_code == 400 and "HELIX_MAX_SCHEMA_BYTES" in big.json["message"]


@pytest.mark.parametrize("schema", [bomb(40), {"allOf": [{"anyOf": [
    {"type": "object", "properties": {f"a{i}": {"type": "string"}}},
    {"type": "object", "properties": {f"b{i}": {"type": "integer"}}}]} for i in range(20)]}])
def test_a_schema_that_would_explode_is_answered_fast(client, user, schema):
    started = time.monotonic()
    response = start(client, user, with_schema(schema))
    assert time.monotonic() - started < 2
    assert response.status_code in (201, 400), response.json


def test_the_native_api_stores_the_params_and_checks_them_when_a_session_continues(client, user, db, fake):
    params = {"response_format": SCHEMA_FORMAT, "tools": [TOOL], "tool_choice": "auto",
              "parallel_tool_calls": False, "logprobs": True, "top_logprobs": 2}
    created = start(client, user, params)
    assert created.status_code == 201, created.json
    with db.orm_read() as s:
        assert s.scalars(select(Task)).one().params == params
    complete(fake, {"text": '{"city": "Oslo"}', "finish_reason": "stop"})
    url = f"/api/v1/sessions/{created.json['id']}/messages"
    refused = client.post(url, headers=user, json={"message": "more", "params": {"response_format": {"type": "yaml"}}})
    assert refused.status_code == 400 and refused.json["field"] == "params.response_format.type"
    assert count(db, Task) == 1
    taken = client.post(url, headers=user, json={"message": "more",
                                                 "params": {"response_format": {"type": "json_object"}}})
    assert taken.status_code == 201, taken.json


def test_top_logprobs_0_asks_for_nothing_with_or_without_logprobs(client, user, db):
    for params in ({"top_logprobs": 0}, {"logprobs": False, "top_logprobs": 0}):
        assert start(client, user, params).status_code == 201


def test_v1_stores_the_params_as_sent(client, user, db, fake):
    body = {"response_format": SCHEMA_FORMAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {
        "name": "get_weather"}}, "parallel_tool_calls": True, "logprobs": True, "top_logprobs": 1}
    with in_background(lambda: complete(fake, {"text": "", "tool_calls": [CALL]})):
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, **body})
    assert response.status_code == 200, response.json
    with db.orm_read() as s:
        assert s.scalars(select(Task)).one().params == {"temperature": 1.0, **body}


# Replies.


def test_a_reply_that_calls_tools_is_openais_message_with_tool_calls_and_logprobs(client, user, db, fake):
    result = {"text": "", "finish_reason": "tool_calls", "tool_calls": [CALL, {**CALL, "id": "call_1_1"}],
              "logprobs": LOGPROBS}
    with in_background(lambda: complete(fake, result)):
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, "tools": [TOOL],
                                                         "logprobs": True, "top_logprobs": 2})
    assert response.status_code == 200, response.json
    [choice] = response.json["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        for call_id in ("call_1_0", "call_1_1")]
    assert choice["logprobs"] == {"content": LOGPROBS}
    parsed = ChatCompletion.model_validate(response.json)
    assert parsed.choices[0].message.tool_calls[1].function.name == "get_weather"
    assert parsed.choices[0].logprobs.content[0].top_logprobs[1].token == "Yo"

    session_id = int(response.headers["X-Helix-Session-Id"])
    with db.orm_read() as s:
        rows = s.scalars(select(ToolCall).order_by(ToolCall.position)).all()
        reply = s.scalars(select(Interaction).where(Interaction.creator == Creator.ASSISTANT)).one()
        assert [(r.session_id, r.interaction_id, r.position, r.call_id, r.name, r.arguments, r.result)
                for r in rows] == [(session_id, reply.id, 0, "call_1_0", "get_weather", CALL["arguments"], None),
                                   (session_id, reply.id, 1, "call_1_1", "get_weather", CALL["arguments"], None)]
    shown = client.get(f"/api/v1/sessions/{session_id}", headers=user).json
    assert [i["tool_calls"] for i in shown["interactions"]] == [[], [
        {"id": "call_1_0", "name": "get_weather", "arguments": CALL["arguments"], "result": None},
        {"id": "call_1_1", "name": "get_weather", "arguments": CALL["arguments"], "result": None}]]


def test_a_result_with_many_logprobs_is_taken_past_the_bodies_1_mib_cap(client, user, fake):
    # 1,200 tokens with 20 alternatives each: about 1.4 MB of JSON, over the cap of every other request body.
    many = [{**LOGPROBS[0], "top_logprobs": LOGPROBS[0]["top_logprobs"] * 10} for _ in range(1200)]
    with in_background(lambda: complete(fake, {"text": "Hi" * 1200, "logprobs": many})):
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, "logprobs": True,
                                                         "top_logprobs": 20})
    assert response.status_code == 200, response.json
    assert len(response.json["choices"][0]["logprobs"]["content"]) == 1200


def test_logprobs_are_null_unless_asked_and_text_with_calls_keeps_its_content(client, user, fake):
    with in_background(lambda: complete(fake, {"text": "Let me look.", "tool_calls": [CALL], "logprobs": LOGPROBS})):
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": HELLO, "tools": [TOOL]})
    [choice] = response.json["choices"]
    assert choice["logprobs"] is None and choice["message"]["content"] == "Let me look."
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1


def test_a_streamed_reply_sends_tool_calls_and_logprobs_as_openai_chunks(client, user, fake):
    result = {"text": "Hi", "tool_calls": [CALL], "logprobs": LOGPROBS, "finish_reason": "tool_calls"}
    with in_background(lambda: complete(fake, result, "Hi")):
        data = client.post(CHAT, headers=user, json={
            "model": TEXT_MODEL, "messages": HELLO, "tools": [TOOL], "logprobs": True, "top_logprobs": 2,
            "stream": True, "stream_options": {"include_usage": True}}).get_data()
    chunks = sse(data)
    assert chunks[-1] == "[DONE]"
    for chunk in chunks[:-1]:
        ChatCompletionChunk.model_validate(chunk)
    choices = [c["choices"][0] for c in chunks[:-2]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == "Hi"
    [scored] = [c for c in choices if c["logprobs"] is not None]
    assert scored["logprobs"] == {"content": LOGPROBS} and "tool_calls" not in scored["delta"]
    calls = [c["delta"]["tool_calls"] for c in choices if "tool_calls" in c["delta"]]
    assert calls == [[{"index": 0, "id": "call_1_0", "type": "function",
                       "function": {"name": "get_weather", "arguments": ""}}],
                     [{"index": 0, "function": {"arguments": CALL["arguments"]}}]]
    assert choices.index(scored) < len(choices) - 3  # the scores come before the calls and the finish
    assert choices[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert chunks[-2]["usage"] == USAGE


class Weather(BaseModel):
    city: str


def official_client(app, user: dict[str, str]) -> openai.OpenAI:
    """OpenAI's own Python client, talking to the test app in-process."""
    key = user["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url="http://localhost/v1", api_key=key, max_retries=0,
                         http_client=httpx.Client(transport=httpx.WSGITransport(app=app)))


def test_the_official_clients_stream_helper_assembles_the_calls(app, user, fake):
    result = {"text": "", "tool_calls": [CALL, {**CALL, "id": "call_1_1", "arguments": '{"city": "Rome"}'}]}
    with in_background(lambda: complete(fake, result)):
        with official_client(app, user).chat.completions.stream(
                model=TEXT_MODEL, messages=HELLO, tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
                logprobs=True) as stream:
            final = stream.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.parsed_arguments) for c in message.tool_calls] == [
        ("call_1_0", Weather(city="Paris")), ("call_1_1", Weather(city="Rome"))]


def test_the_official_clients_parse_takes_a_pydantic_response_format(app, user, db, fake):
    with in_background(lambda: complete(fake, {"text": '{"city": "Oslo"}'}, '{"city": ', '"Oslo"}')):
        completion = official_client(app, user).chat.completions.parse(
            model=TEXT_MODEL, messages=HELLO, response_format=Weather)
    assert completion.choices[0].message.parsed == Weather(city="Oslo")
    with db.orm_read() as s:
        sent = s.scalars(select(Task)).one().params["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True


# A chat's earlier calls and their results.


ASKED = {"role": "user", "content": "Weather in Paris?"}
CALLED = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_9_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
ANSWERED = {"role": "tool", "tool_call_id": "call_9_0", "content": "18 C, sunny"}


def test_a_chat_ending_in_a_tool_result_is_answered_and_its_calls_are_stored(client, user, db, fake):
    messages = [{"role": "system", "content": "Be brief."}, ASKED, CALLED, ANSWERED]
    with in_background(lambda: complete(fake, {"text": "Sunny, 18 C."})):
        response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": messages, "tools": [TOOL]})
    assert response.status_code == 200, response.json
    assert response.json["choices"][0]["message"] == {"role": "assistant", "content": "Sunny, 18 C."}
    with db.orm_read() as s:
        task = s.scalars(select(Task)).one()
        turns = [(i.creator, i.message, i.output, i.task is not None)
                 for i in s.scalars(select(Interaction).order_by(Interaction.id))]
        [row] = s.scalars(select(ToolCall)).all()
    assert task.input["messages"] == [messages[0], ASKED, {**CALLED, "content": ""}, ANSWERED]
    # No user turn of its own: the reply follows the tool result.
    assert turns == [(Creator.USER, "Weather in Paris?", "", False), (Creator.ASSISTANT, "", "", False),
                     (Creator.ASSISTANT, "", "Sunny, 18 C.", True)]
    assert (row.call_id, row.name, row.arguments, row.result) == ("call_9_0", "get_weather", '{"city": "Paris"}',
                                                                  "18 C, sunny")

    session_id = task.session_id
    continued = client.post(f"/api/v1/sessions/{session_id}/messages", headers=user, json={"message": "Thanks"})
    assert continued.status_code == 201, continued.json
    assert continued.json["interactions"][1]["tool_calls"] == [
        {"id": "call_9_0", "name": "get_weather", "arguments": '{"city": "Paris"}', "result": "18 C, sunny"}]
    with db.orm_read() as s:
        later = s.scalars(select(Task).where(Task.id != task.id)).one()
    assert later.input["messages"] == [ASKED, {**CALLED, "content": ""}, ANSWERED,
                                       {"role": "assistant", "content": "Sunny, 18 C."},
                                       {"role": "user", "content": "Thanks"}]


def test_a_native_reply_that_called_tools_is_in_the_next_turns_history(client, user, db, fake):
    created = start(client, user, {"tools": [TOOL]})
    complete(fake, {"text": "", "tool_calls": [CALL], "finish_reason": "tool_calls"})
    url = f"/api/v1/sessions/{created.json['id']}/messages"
    assert client.post(url, headers=user, json={"message": "And Rome?"}).status_code == 201
    with db.orm_read() as s:
        later = s.scalars(select(Task).order_by(Task.id.desc())).first()
    # Nobody sent the call a result, so there is no tool message: the user's next message follows the call.
    assert later.input["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1_0", "type": "function", "function": {
            "name": "get_weather", "arguments": CALL["arguments"]}}]},
        {"role": "user", "content": "And Rome?"}]


@pytest.mark.parametrize("messages,param", [
    ([ASKED, CALLED, {**ANSWERED, "tool_call_id": "call_other"}], "messages[2].tool_call_id"),
    ([ASKED, {**ANSWERED}], "messages[1].tool_call_id"),
    ([ASKED, CALLED], "messages[1].role"),
    ([ASKED, {**CALLED, "tool_calls": [{**CALLED["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": "{not json"}}]}, ANSWERED], "messages[1].tool_calls[0].function.arguments"),
    ([ASKED, {**CALLED, "tool_calls": [{**CALLED["tool_calls"][0], "id": "c" * 65}]}, ANSWERED],
     "messages[1].tool_calls[0].id"),
    ([ASKED, {**CALLED, "tool_calls": CALLED["tool_calls"] * 2}, ANSWERED], "messages[1].tool_calls[1].id"),
    ([ASKED, {**CALLED, "tool_calls": "call it"}, ANSWERED], "messages[1].tool_calls"),
    ([{**ASKED, "tool_call_id": "call_9_0"}], "messages[0].tool_call_id"),
    ([ASKED, {**CALLED, "function_call": {"name": "f"}}, ANSWERED], "messages[1].function_call"),
])
def test_a_bad_history_of_calls_is_a_400_naming_the_message(client, user, db, messages, param):
    response = client.post(CHAT, headers=user, json={"model": TEXT_MODEL, "messages": messages, "tools": [TOOL]})
    assert response.status_code == 400, response.json
    assert response.json["error"]["param"] == param
    assert count(db, Task) == 0 and count(db, ToolCall) == 0


def test_a_session_deleted_takes_its_tool_calls_with_it(client, user, db, fake):
    created = start(client, user, {"tools": [TOOL]})
    complete(fake, {"text": "", "tool_calls": [CALL]})
    assert count(db, ToolCall) == 1
    with db.transaction() as conn:
        conn.exec_driver_sql(f"DELETE FROM sessions WHERE id = {int(created.json['id'])}")
    assert count(db, ToolCall) == 0


def test_tool_call_rows_read_plainly_in_sql(client, user, db, fake):
    created = start(client, user, {"tools": [TOOL]})
    complete(fake, {"text": "", "tool_calls": [CALL]})
    with db.transaction() as conn:
        rows = conn.exec_driver_sql(
            "SELECT c.position, c.call_id, c.name, c.arguments, c.result FROM tool_calls c "
            f"JOIN interactions i ON i.id = c.interaction_id WHERE c.session_id = {int(created.json['id'])} "
            "ORDER BY c.interaction_id, c.position").all()
    assert [tuple(r) for r in rows] == [(0, "call_1_0", "get_weather", CALL["arguments"], None)]
    assert json.loads(rows[0][3]) == {"city": "Paris"}
