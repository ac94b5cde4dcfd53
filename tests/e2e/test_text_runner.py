"""The Mistral runner end to end on the tiny model: `helix serve` and `helix-runner --backend mistral` processes.

Each reply is compared with what the backend produces in this process for the same conversation, params
and adapter: the runner over HTTP must give exactly that text, streamed in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.doubles import FakeFiles, FakeReport
from tests.e2e.conftest import (
    ApiServer,
    RunnerProcess,
    get_session,
    read_sse,
    reply_of,
    wait_for,
    wait_for_reply,
)
from tests.runner.backends.text_doubles import make_adapter, text_config, text_task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PARAMS = {"max_new_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 11}


@pytest.fixture(scope="module")
def local_backend(tiny_mistral: Path):
    """The backend in this process, for the text each reply must have."""
    from runner.backends.mistral import MistralBackend

    backend = MistralBackend(text_config(tiny_mistral))
    backend.setup()
    return backend


def expected(backend, messages: list[dict[str, str]], params: dict[str, Any], adapter_dir: Path | None = None) -> str:
    files = FakeFiles()
    adapter = None
    if adapter_dir is not None:
        files.dirs[1] = adapter_dir
        adapter = {"id": 1, "sha256": f"local:{adapter_dir}", "name": "adapter.zip"}
    return backend.predict(text_task(messages, adapter=adapter, **params), FakeReport(files))["text"]


@pytest.fixture
def text_runner(runner_process: Callable[..., RunnerProcess]) -> Callable[..., RunnerProcess]:
    """Start `helix-runner` on the tiny model: `text_runner(server, name, model=..., max_parallel=...)`."""

    def start(server: ApiServer, name: str, *, model: str, mode: str = "create", backend: str = "mistral",
              max_parallel: int = 1, env: dict[str, str] | None = None) -> RunnerProcess:
        return runner_process(server, server.runner_token, name, backend=backend, mode=mode, type_="text",
                              model_name=model, env=env, extra=("--device", "cpu", "--max-parallel", str(max_parallel)))

    return start


@pytest.fixture
def tiny_server(api_server, tiny_mistral: Path) -> ApiServer:
    """The API offering the tiny model (by its path) as a text model."""
    return api_server(models=f"text:{tiny_mistral}")


def create(server: ApiServer, model: str, message: str, **params: Any) -> dict[str, Any]:
    response = requests.post(f"{server.url}/api/v1/sessions", headers=server.user, timeout=30,
                             json={"mode": "create", "type": "text", "model_name": model, "message": message,
                                   "params": params})
    assert response.status_code == 201, response.text
    return response.json()


def say(server: ApiServer, session_id: int, message: str, **params: Any) -> None:
    response = requests.post(f"{server.url}/api/v1/sessions/{session_id}/messages", headers=server.user,
                             timeout=30, json={"message": message, "params": params})
    assert response.status_code in (200, 201), response.text


def streamed_text(server: ApiServer, session_id: int) -> list[str]:
    """The token events of the session's last reply, in order."""
    with requests.get(f"{server.url}/api/v1/sessions/{session_id}/events", headers=server.user,
                      params={"follow": "0"}, stream=True, timeout=(5, 30)) as response:
        events = list(read_sse(response))
    tokens = [e["data"] for e in events if e["event"] == "token"]
    last = max(t["interaction_id"] for t in tokens) if tokens and "interaction_id" in tokens[0] else None
    return [t["text"] for t in tokens if last is None or t["interaction_id"] == last]


def test_two_turn_chat_streams_the_text_the_model_makes(tiny_server, tiny_mistral, text_runner, local_backend):
    model = str(tiny_mistral)
    text_runner(tiny_server, "chat", model=model)
    first = "Hello! How are you today?"
    session = create(tiny_server, model, first, **PARAMS)
    reply = wait_for_reply(tiny_server, tiny_server.user, session["id"], 120)
    assert reply["state"] == "complete", reply
    assert reply["output"] == expected(local_backend, [{"role": "user", "content": first}], PARAMS)
    assert "".join(streamed_text(tiny_server, session["id"])) == reply["output"]
    usage = reply["result"]["usage"]
    assert usage["completion_tokens"] <= PARAMS["max_new_tokens"]
    assert reply["result"]["finish_reason"] in ("stop", "length")

    second = "Tell me a story about a dragon."
    say(tiny_server, session["id"], second, **PARAMS)
    wait_for(lambda: len(get_session(tiny_server, tiny_server.user, session["id"])["interactions"]) >= 4, 30,
             "the second turn")
    again = wait_for_reply(tiny_server, tiny_server.user, session["id"], 120)
    conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": reply["output"]},
                    {"role": "user", "content": second}]
    assert again["output"] == expected(local_backend, conversation, PARAMS)
    assert again["result"]["usage"]["prompt_tokens"] == len(local_backend.prompt_ids(conversation))


def test_cancel_stops_a_long_generation_and_the_runner_carries_on(tiny_server, tiny_mistral, text_runner):
    model = str(tiny_mistral)
    runner = text_runner(tiny_server, "canceller", model=model)
    session = create(tiny_server, model, "Go on forever.", max_new_tokens=4000)
    wait_for(lambda: reply_of(get_session(tiny_server, tiny_server.user, session["id"]))["output"], 120,
             "the first tokens")
    response = requests.post(f"{tiny_server.url}/api/v1/sessions/{session['id']}/cancel", headers=tiny_server.user,
                             timeout=30)
    assert response.status_code == 200, response.text
    reply = wait_for_reply(tiny_server, tiny_server.user, session["id"], 60, states=("cancelled",))
    assert reply["result"] is None
    wait_for(lambda: "cancelled by the user" in runner.log_text(), 30, "the runner to stop generating")
    after = create(tiny_server, model, "Still there?", max_new_tokens=4)
    assert wait_for_reply(tiny_server, tiny_server.user, after["id"], 60)["state"] == "complete"


def test_sessions_with_and_without_an_adapter_each_get_the_right_one(tiny_server, tiny_mistral, text_runner,
                                                                      local_backend, tmp_path):
    model = str(tiny_mistral)
    adapter_dir = make_adapter(tiny_mistral, tmp_path / "adapter", seed=5)
    text_runner(tiny_server, "trainer", model=model, mode="finetune",
                backend="tests.e2e.text_doubles:AdapterUploadBackend", env={"HELIX_TEST_ADAPTER_DIR": str(adapter_dir)})
    text_runner(tiny_server, "server", model=model, max_parallel=2)
    lines = "\n".join(json.dumps({"question": f"What is {n} plus {n}?", "answer": f"{2 * n}."}) for n in range(12))
    response = requests.post(f"{tiny_server.url}/api/v1/sessions", headers=tiny_server.user, timeout=30,
                             data={"mode": "finetune", "type": "text", "model_name": model},
                             files=[("files", ("qa.jsonl", lines.encode(), "application/jsonl"))])
    assert response.status_code == 201, response.text
    tuned = response.json()
    wait_for(lambda: get_session(tiny_server, tiny_server.user, tuned["id"])["mode"] == "create", 120,
             "the fine-tune to complete")

    question = "Who are you?"
    plain = create(tiny_server, model, question, **PARAMS)
    say(tiny_server, tuned["id"], question, **PARAMS)
    plain_reply = wait_for_reply(tiny_server, tiny_server.user, plain["id"], 120)
    tuned_reply = wait_for_reply(tiny_server, tiny_server.user, tuned["id"], 120)
    assert tuned_reply["message"] == "" and tuned_reply["creator"] == "assistant"

    # A fine-tune's turn is no part of the chat that follows it: both sessions send the same conversation.
    messages = [{"role": "user", "content": question}]
    with_adapter = expected(local_backend, messages, PARAMS, adapter_dir)
    without = expected(local_backend, messages, PARAMS)
    assert with_adapter != without
    assert tuned_reply["output"] == with_adapter
    assert plain_reply["output"] == without


def test_four_chats_at_once_each_get_the_text_they_get_alone(tiny_server, tiny_mistral, text_runner, local_backend):
    model = str(tiny_mistral)
    chats = [(f"Question number {n}: what is {n} plus {n}?", {**PARAMS, "seed": n, "max_new_tokens": 16 + 4 * n})
             for n in range(4)]
    sessions = [create(tiny_server, model, message, **params) for message, params in chats]
    text_runner(tiny_server, "batcher", model=model, max_parallel=4)
    for session, (message, params) in zip(sessions, chats, strict=True):
        reply = wait_for_reply(tiny_server, tiny_server.user, session["id"], 120)
        assert reply["output"] == expected(local_backend, [{"role": "user", "content": message}], params)
        assert "".join(streamed_text(tiny_server, session["id"])) == reply["output"]
