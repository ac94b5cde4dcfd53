"""Structured output and tool calls through /v1, against a real `helix serve` and `helix-runner --backend mistral`.

On the tiny random-weight Mistral, whose free text is noise, a reply that parses and validates can only come
from the constraint applied token by token in the runner: these tests prove enforcement, on SQLite and
PostgreSQL, in a batch beside an unconstrained chat, and across a runner killed mid-reply. On
SmolLM2-135M-Instruct the programs people point at an OpenAI endpoint run as they are: the official client's
`chat.completions.parse`, LangChain's `with_structured_output` and `bind_tools`, a whole tool round trip.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from pydantic import BaseModel, Field

from runner.smollm import NAME
from tests.e2e.client import openai_client
from tests.e2e.processes import SQLITE_ONLY, ApiServer, RunnerProcess, wait_for
from tests.real_model import runner_env, smollm2_hub

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ASK = [{"role": "user", "content": "Describe a person."}]
# Every string and number bounded, so a reply from noise ends well inside its token budget.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 20},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "role": {"enum": ["owner", "reader"]},
    },
    "required": ["name", "age", "admin", "tags", "role"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
SCHEMA_OF = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
SEEDS = range(4)


@pytest.fixture
def tiny_server(text_api: ApiServer, tiny_mistral: Path, text_runner: Callable[..., RunnerProcess]) -> ApiServer:
    """The tiny Mistral served by one runner that batches four chats."""
    text_runner(text_api, "create", tiny_mistral, "tiny", max_parallel=4)
    return text_api


def _post(server: ApiServer, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300,
                             headers={"Authorization": f"Bearer {server.api_key}"})
    assert response.status_code == 200, response.text
    return response.json()


def _valid_calls(message: Any, names: set[str]) -> list[Any]:
    calls = message.tool_calls or []
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names, call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    return calls


def test_replies_from_noise_parse_and_validate_when_constrained(tiny_server, tiny_mistral):
    client = openai_client(tiny_server)
    model = str(tiny_mistral)
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    stopped_objects = 0
    for seed in SEEDS:
        ask = {"model": model, "messages": ASK, "seed": seed, "temperature": 1.0}
        plain = client.chat.completions.create(**ask, max_tokens=40)
        with pytest.raises(ValueError):  # the model's own text is noise: what follows proves the constraint
            json.loads(plain.choices[0].message.content)

        shaped = client.chat.completions.create(**ask, max_tokens=200, response_format=schema_format)
        assert shaped.choices[0].finish_reason == "stop", shaped
        jsonschema.validate(json.loads(shaped.choices[0].message.content), PERSON)

        # Any object: noise may write a string longer than the budget, which ends with finish_reason length as
        # OpenAI's does; every reply that ended by itself is one JSON object.
        anything = client.chat.completions.create(**ask, max_tokens=120, response_format={"type": "json_object"})
        if anything.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(anything.choices[0].message.content), dict)
            stopped_objects += 1

        # One call: noise rarely ends a list of calls where a model would, so parallel calls would run on.
        called = client.chat.completions.create(**ask, max_tokens=200, tools=[WEATHER, TIME],
                                                tool_choice="required", parallel_tool_calls=False)
        assert called.choices[0].finish_reason == "tool_calls" and not called.choices[0].message.content
        assert len(_valid_calls(called.choices[0].message, {"get_weather", "get_time"})) == 1
        assert called.usage.completion_tokens > 0

        named = client.chat.completions.create(**ask, max_tokens=200, tools=[WEATHER, TIME],
                                               parallel_tool_calls=False,
                                               tool_choice={"type": "function", "function": {"name": "get_time"}})
        [call] = _valid_calls(named.choices[0].message, {"get_time"})
    assert stopped_objects >= 1, "no json_object reply ended by itself"


def test_the_same_constraint_streams_and_logprobs_come_after_the_mask(tiny_server, tiny_mistral):
    client = openai_client(tiny_server)
    ask = {"model": str(tiny_mistral), "messages": ASK, "seed": 3, "temperature": 1.0, "max_tokens": 200,
           "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
           "logprobs": True, "top_logprobs": 5}
    whole = client.chat.completions.create(**ask)
    text = whole.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens or len(entries) == whole.usage.completion_tokens - 1
    for entry in entries:
        assert entry.logprob <= 0 and 1 <= len(entry.top_logprobs) <= 5
        # After the mask a forbidden token has no probability: every alternative shown was allowed.
        assert all(alt.logprob > float("-inf") for alt in entry.top_logprobs)

    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]


def test_a_constrained_and_a_free_chat_in_one_batch_each_get_what_they_asked(tiny_server, tiny_mistral):
    model = str(tiny_mistral)
    free = {"model": model, "messages": ASK, "seed": 11, "temperature": 1.0, "max_tokens": 60}
    shaped = {**free, "max_tokens": 200,
              "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    alone = _post(tiny_server, free)["choices"][0]["message"]["content"]

    answers: dict[str, Any] = {}
    go = threading.Barrier(4)

    def ask(key: str, body: dict[str, Any]) -> None:
        go.wait()
        answers[key] = _post(tiny_server, body)

    threads = [threading.Thread(target=ask, args=(f"{kind}{i}", body))
               for i in range(2) for kind, body in (("free", free), ("shaped", shaped))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for key, answer in answers.items():
        content = answer["choices"][0]["message"]["content"]
        if key.startswith("free"):
            assert content == alone  # the batch's constrained rows left this row's logits alone
        else:
            jsonschema.validate(json.loads(content), PERSON)
    assert len(answers) == 4


def test_a_retry_after_kill_9_is_constrained_too(text_api, tiny_mistral, text_runner):
    first = text_runner(text_api, "create", tiny_mistral, "first")
    # A long, exact string keeps the first runner busy long enough to be killed mid-reply.
    long_schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 1200,
                                                              "maxLength": 1200}},
                   "required": ["story"], "additionalProperties": False}
    body = {"model": str(tiny_mistral), "messages": ASK, "seed": 5, "temperature": 1.0, "max_tokens": 4096,
            "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": long_schema}}}
    answers: list[dict[str, Any]] = []
    waiting = threading.Thread(target=lambda: answers.append(_post(text_api, body)))
    waiting.start()
    wait_for(lambda: text_api.sql("SELECT id FROM tasks WHERE status = 'running' AND last_event_seq > 0"), 120,
             "the first runner to stream part of the reply", interval=0.05)
    first.signal(signal.SIGKILL)
    first.wait(30)
    text_runner(text_api, "create", tiny_mistral, "second")
    waiting.join(300)
    [answer] = answers
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), long_schema)
    [(attempt, runner)] = text_api.sql("SELECT attempt, runner FROM tasks")
    assert attempt == 2 and runner == "second"


# SmolLM2-135M-Instruct: what programs built on the OpenAI API do.


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)
    city: str = Field(max_length=40)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_hub()


@pytest.fixture
def real_server(api_server: Callable[..., ApiServer], smollm2: Path,
                text_runner: Callable[..., RunnerProcess]) -> ApiServer:
    server = api_server(models=f"text:{NAME}")
    text_runner(server, "create", NAME, "smollm2", env=runner_env(smollm2), max_parallel=2)
    return server


# One test of several programs: the model loads once (each runner start costs a good part of a minute here).
@SQLITE_ONLY
def test_the_official_client_and_langchain_get_parsed_models_tool_calls_and_a_tool_round_trip(real_server):
    _official_client_parses_a_pydantic_model_and_streams_a_tool_call(real_server)
    _a_tool_round_trip_ends_in_a_text_answer_stored_as_sql(real_server)
    _langchain_structured_output_and_bound_tools(real_server)


def _official_client_parses_a_pydantic_model_and_streams_a_tool_call(real_server: ApiServer) -> None:
    client = openai_client(real_server)
    parsed = client.chat.completions.parse(
        model=NAME, temperature=0, max_tokens=120, response_format=Person,
        messages=[{"role": "user", "content": "Alice is 31 and lives in Paris. Give her as JSON."}])
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.age == 31, parsed

    ask = {"model": NAME, "temperature": 0, "max_tokens": 80, "tools": [WEATHER, TIME], "tool_choice": "required",
           "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    whole = client.chat.completions.create(**ask)
    assert whole.choices[0].finish_reason == "tool_calls"
    calls = _valid_calls(whole.choices[0].message, {"get_weather", "get_time"})
    with client.chat.completions.stream(**ask) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert final.choices[0].finish_reason == "tool_calls"


def _a_tool_round_trip_ends_in_a_text_answer_stored_as_sql(real_server: ApiServer) -> None:
    client = openai_client(real_server)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    asked = client.chat.completions.create(model=NAME, temperature=0, max_tokens=80, messages=messages,
                                           tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    [call] = _valid_calls(asked.choices[0].message, {"get_weather"})
    messages.append(asked.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny, 18 degrees."})
    told = client.chat.completions.create(model=NAME, temperature=0, max_tokens=60, messages=messages,
                                          tools=[WEATHER])
    answer = told.choices[0]
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert answer.message.content and "<tool_call>" not in answer.message.content

    # An operator reads the call, its arguments and its result in SQL.
    rows = real_server.sql("SELECT name, arguments, result FROM tool_calls ORDER BY id")
    assert ("get_weather", call.function.arguments, None) in [tuple(r) for r in rows]
    assert ("get_weather", call.function.arguments, "Sunny, 18 degrees.") in [tuple(r) for r in rows]


def _langchain_structured_output_and_bound_tools(real_server: ApiServer) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=NAME, base_url=f"{real_server.url}/v1", api_key=real_server.api_key, temperature=0,
                     max_tokens=120, max_retries=0)
    person = llm.with_structured_output(Person).invoke("Bob is 45 and lives in Rome. Describe him.")
    assert isinstance(person, Person) and person.age == 45, person

    @tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        return f"Sunny in {city}"

    message = llm.bind_tools([get_weather], tool_choice="required").invoke("What is the weather in Rome?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str), message
