"""`helix chat --json | --json-schema | --tools | --tool-choice`, and how JSON and tool-call replies print.

The chat runs in-process: its `Remote` is the API's test client, and a scripted runner answers each
reply before the CLI reads its events.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from helix_api.cli import remote as remote_module
from helix_api.cli import shapes
from helix_api.cli.operator import main
from tests.conftest import TEXT_MODEL, claim

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


class AppRemote:
    """A `Remote` on the test client; before a reply's events are read, `answer` completes its task."""

    def __init__(self, client, key: str, runner: dict[str, str]) -> None:
        self.client, self.headers, self.runner = client, {"Authorization": f"Bearer {key}"}, runner
        self.sent: list[tuple[str, str, Any]] = []
        self.answer: dict[str, Any] = {"tokens": [], "result": {"text": ""}}

    def close(self) -> None:
        """Nothing to close."""

    def call(self, method: str, path: str, json: Any = None, params: Any = None) -> Any:
        self.sent.append((method, path, json))
        response = self.client.open(path, method=method, json=json, query_string=params, headers=self.headers)
        if response.status_code >= 400:
            raise remote_module.RemoteError(response.json["message"])
        return response.json

    def events(self, session_id: int, after: str | None = None):
        claimed = claim(self.client, self.runner).json
        task, token = claimed["task"]["id"], claimed["lease"]["token"]
        tokens = [{"seq": n, "kind": "token", "text": text} for n, text in enumerate(self.answer["tokens"], 1)]
        base = f"/api/v1/worker/task/{task}"
        if tokens:
            self.client.post(f"{base}/events", headers=self.runner, json={"lease_token": token, "events": tokens})
        done = self.client.post(f"{base}/complete", headers=self.runner,
                                json={"lease_token": token, "result": self.answer["result"]})
        assert done.status_code == 200, done.json
        stream = self.client.get(f"/api/v1/sessions/{session_id}/events?follow=0",
                                 headers={**self.headers, "Last-Event-ID": after or "0"})
        yield from remote_module._parse(iter(stream.data.decode().splitlines()))


@pytest.fixture
def chat(client, runner, make_key, monkeypatch) -> Callable[..., tuple[Any, AppRemote]]:
    """`chat("--json", input="hi\\n", answer=...)`: run `helix chat MODEL ...`; its result and its remote."""
    remote = AppRemote(client, make_key("cli-user"), runner)
    monkeypatch.setattr(remote_module, "Remote", lambda url, key: remote)

    def run(*args: str, input: str = "", answer: dict[str, Any] | None = None):
        if answer:
            remote.answer = answer
        result = CliRunner().invoke(main, ["chat", TEXT_MODEL, "--api-key", "hx_test", *args], input=input)
        return result, remote
    return run


@pytest.fixture
def make_key(db):
    from helix_api.accounts.auth import create_user

    def make(name: str) -> str:
        with db.orm_write() as session:
            return create_user(session, name)[1]
    return make


def write(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# Reading the options.


def test_a_schema_file_becomes_a_json_schema_format_named_after_it(tmp_path):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    made = shapes.schema_format(write(tmp_path, "weather report.v2.json", schema))

    assert made == {"type": "json_schema",
                    "json_schema": {"name": "weather_report_v2", "schema": schema, "strict": True}}


@pytest.mark.parametrize("content,said", [
    ("{not json", "is not JSON: Expecting property name"),
    ("[1, 2]", r"must hold a JSON Schema \(an object\), not list"),
])
def test_a_bad_schema_file_is_a_clear_error(tmp_path, content, said):
    with pytest.raises(click.BadParameter, match=said):
        shapes.schema_format(write(tmp_path, "s.json", content))


@pytest.mark.parametrize("content,said", [
    ({"type": "function", "function": {"name": "x"}}, "must hold a list of tools"),
    ([], "must hold a list of tools"),
    ([WEATHER, {"name": "get_time"}], "tool 2 of .* is not"),
    ([{"type": "function", "function": {"name": "x", "parameters": "city"}}], "must be a JSON Schema"),
    ([WEATHER, WEATHER], "names the tool 'get_weather' twice"),
])
def test_a_bad_tools_file_is_a_clear_error(tmp_path, content, said):
    with pytest.raises(click.BadParameter, match=said):
        shapes.tool_definitions(write(tmp_path, "tools.json", content))


def test_tool_choice_takes_a_mode_or_the_name_of_a_tool():
    assert shapes.tool_choice("required", [WEATHER]) == "required"
    assert shapes.tool_choice("get_weather", [WEATHER]) == {"type": "function", "function": {"name": "get_weather"}}
    with pytest.raises(click.BadParameter, match=r"or a tool of --tools \(get_weather\), not 'get_time'"):
        shapes.tool_choice("get_time", [WEATHER])
    with pytest.raises(click.BadParameter, match="needs --tools"):
        shapes.tool_choice("auto", None)


# Printing replies.


def test_a_tool_call_prints_on_one_line_with_its_result_below():
    call = {"id": "call_1_0", "name": "get_weather", "arguments": '{\n "city":"Paris"}', "result": None}
    assert shapes.tool_call_lines(call) == ['→ call get_weather {"city": "Paris"}']
    assert shapes.tool_call_lines({**call, "arguments": "{oops", "result": "21 C\n, sunny"}) == [
        "→ call get_weather {oops", "← 21 C , sunny"]


def test_json_is_indented_and_a_reply_cut_short_printed_as_it_came():
    assert shapes.pretty_json('{"a":[1]}') == '{\n  "a": [\n    1\n  ]\n}'
    assert shapes.pretty_json('{"a": [1') == '{"a": [1'
    assert shapes.asks_for_json({"response_format": {"type": "json_schema"}})
    assert not shapes.asks_for_json({"response_format": {"type": "text"}}) and not shapes.asks_for_json(None)


# helix chat.


@pytest.mark.parametrize("args,said", [
    (("--json-schema", "missing.json"), "cannot read missing.json: No such file or directory"),
    (("--tools", "bad.json"), "bad.json is not JSON"),
    (("--json", "--json-schema", "schema.json"), "--json and --json-schema are two ways to ask for JSON"),
    (("--tool-choice", "required"), "Invalid value for --tool-choice: needs --tools"),
    (("--tools", "tools.json", "--tool-choice", "get_time"), "not 'get_time'"),
])
def test_bad_options_are_refused_before_anything_is_sent(chat, tmp_path, monkeypatch, args, said):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "bad.json", "[{")
    write(tmp_path, "schema.json", {"type": "object"})
    write(tmp_path, "tools.json", [WEATHER])

    result, remote = chat(*args, input="hello\n")

    assert result.exit_code == 2 and said in result.output, result.output
    assert remote.sent == []


def test_chat_sends_the_shape_params_with_every_message(chat, tmp_path, db):
    schema = write(tmp_path, "city.json", {"type": "object"})
    tools = write(tmp_path, "tools.json", [WEATHER])

    result, remote = chat("--json-schema", str(schema), "--tools", str(tools), "--tool-choice", "get_weather",
                          input="one\ntwo\n", answer={"tokens": ['{"city"', ': "Rome"}'],
                                                      "result": {"text": '{"city": "Rome"}'}})

    assert result.exit_code == 0, result.output
    sent = [body["params"] for method, _, body in remote.sent if method == "POST"]
    expected = {"response_format": shapes.schema_format(schema), "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    assert sent == [expected, expected]


def test_chat_prints_a_json_reply_indented_once_it_is_complete(chat):
    reply = '{"city":"Paris","temp":21}'
    result, _ = chat("--json", input="Weather in Paris?\n",
                     answer={"tokens": [reply[:8], reply[8:]], "result": {"text": reply}})

    assert result.exit_code == 0, result.output
    assert '> {\n  "city": "Paris",\n  "temp": 21\n}\n> ' in result.output
    assert '{"city":"Paris"' not in result.output  # the streamed tokens were held, not printed raw


def test_chat_prints_a_reply_of_tool_calls_one_line_each(chat, tmp_path):
    tools = write(tmp_path, "tools.json", [WEATHER])
    calls = [{"id": "call_1_0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"id": "call_1_1", "name": "get_weather", "arguments": '{"city":"Rome"}'}]

    result, _ = chat("--tools", str(tools), "--tool-choice", "required", input="Paris and Rome?\n",
                     answer={"tokens": [], "result": {"text": "", "finish_reason": "tool_calls", "tool_calls": calls}})

    assert result.exit_code == 0, result.output
    assert '> → call get_weather {"city": "Paris"}\n→ call get_weather {"city": "Rome"}\n> ' in result.output


def test_sessions_show_prints_a_replys_tool_calls(monkeypatch):
    session = {"id": 4, "mode": "create", "type": "text", "model_name": "org/tiny", "state": "complete",
               "interactions": [
                   {"id": 1, "creator": "user", "message": "Weather?"},
                   {"id": 2, "creator": "assistant", "state": "complete", "output": "", "error": None, "files": [],
                    "tool_calls": [{"id": "c0", "name": "get_weather", "arguments": '{"city":"Paris"}',
                                    "result": "21 C"}]}]}

    class Canned:
        def __init__(self, url: str, key: str) -> None:
            pass

        def call(self, method: str, path: str, **kwargs: Any) -> Any:
            assert (method, path) == ("GET", "/api/v1/sessions/4")
            return session

        def close(self) -> None:
            pass

    monkeypatch.setattr(remote_module, "Remote", Canned)
    result = CliRunner().invoke(main, ["sessions", "show", "4", "--api-key", "hx_test"])

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-3:] == ["tiny [complete]: ", '  → call get_weather {"city": "Paris"}',
                                               "  ← 21 C"]
