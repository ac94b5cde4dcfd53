"""The Mistral runner end to end on the tiny model: `helix serve` and `helix-runner --backend mistral` processes.

Each reply is compared with what the backend produces in this process for the same conversation, params
and adapter: the runner over HTTP must give exactly that text, streamed in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.doubles import FakeFiles, FakeReport
from tests.e2e.client import (
    cancel_session,
    create_finetune,
    create_session,
    reply_of,
    send_message,
    session_events,
    wait_for_reply,
    wait_for_session,
)
from tests.e2e.processes import ApiServer
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


def streamed_text(server: ApiServer, session_id: int) -> list[str]:
    """The token events of the session's last reply, in order."""
    tokens = [e["data"] for e in session_events(server, server.user, session_id) if e["event"] == "token"]
    last = max(t["interaction_id"] for t in tokens) if tokens and "interaction_id" in tokens[0] else None
    return [t["text"] for t in tokens if last is None or t["interaction_id"] == last]


def test_two_turn_chat_streams_the_text_the_model_makes(text_api, tiny_mistral, text_runner, local_backend):
    text_runner(text_api, "create", tiny_mistral, "chat")
    first = "Hello! How are you today?"
    session = create_session(text_api, text_api.user, first, model=tiny_mistral, **PARAMS)
    reply = wait_for_reply(text_api, text_api.user, session["id"], 120)
    assert reply["state"] == "complete", reply
    assert reply["output"] == expected(local_backend, [{"role": "user", "content": first}], PARAMS)
    assert "".join(streamed_text(text_api, session["id"])) == reply["output"]
    usage = reply["result"]["usage"]
    assert usage["completion_tokens"] <= PARAMS["max_new_tokens"]
    assert reply["result"]["finish_reason"] in ("stop", "length")

    second = "Tell me a story about a dragon."
    send_message(text_api, text_api.user, session["id"], second, **PARAMS)
    wait_for_session(text_api, text_api.user, session["id"], lambda s: len(s["interactions"]) >= 4, 30,
                     "the second turn")
    again = wait_for_reply(text_api, text_api.user, session["id"], 120)
    conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": reply["output"]},
                    {"role": "user", "content": second}]
    assert again["output"] == expected(local_backend, conversation, PARAMS)
    assert again["result"]["usage"]["prompt_tokens"] == len(local_backend.prompt_ids(conversation))


def test_cancel_stops_a_long_generation_and_the_runner_carries_on(text_api, tiny_mistral, text_runner):
    runner = text_runner(text_api, "create", tiny_mistral, "canceller")
    session = create_session(text_api, text_api.user, "Go on forever.", model=tiny_mistral, max_new_tokens=4000)
    wait_for_session(text_api, text_api.user, session["id"], lambda s: reply_of(s)["output"], 120, "the first tokens")
    cancel_session(text_api, text_api.user, session["id"])
    reply = wait_for_reply(text_api, text_api.user, session["id"], 60, states=("cancelled",))
    assert reply["result"] is None
    runner.wait_for_log("cancelled by the user", 30, "the runner to stop generating")
    after = create_session(text_api, text_api.user, "Still there?", model=tiny_mistral, max_new_tokens=4)
    assert wait_for_reply(text_api, text_api.user, after["id"], 60)["state"] == "complete"


def test_sessions_with_and_without_an_adapter_each_get_the_right_one(text_api, tiny_mistral, text_runner,
                                                                      local_backend, tmp_path):
    adapter_dir = make_adapter(tiny_mistral, tmp_path / "adapter", seed=5)
    text_runner(text_api, "finetune", tiny_mistral, "trainer", backend="tests.e2e.text_doubles:AdapterUploadBackend",
                env={"HELIX_TEST_ADAPTER_DIR": str(adapter_dir)})
    text_runner(text_api, "create", tiny_mistral, "server", max_parallel=2)
    lines = "\n".join(json.dumps({"question": f"What is {n} plus {n}?", "answer": f"{2 * n}."}) for n in range(12))
    tuned = create_finetune(text_api, tiny_mistral, [("files", ("qa.jsonl", lines.encode(), "application/jsonl"))])
    wait_for_session(text_api, text_api.user, tuned["id"], lambda s: s["mode"] == "create", 120,
                     "the fine-tune to complete")

    question = "Who are you?"
    plain = create_session(text_api, text_api.user, question, model=tiny_mistral, **PARAMS)
    send_message(text_api, text_api.user, tuned["id"], question, **PARAMS)
    plain_reply = wait_for_reply(text_api, text_api.user, plain["id"], 120)
    tuned_reply = wait_for_reply(text_api, text_api.user, tuned["id"], 120)
    assert tuned_reply["message"] == "" and tuned_reply["creator"] == "assistant"

    # A fine-tune's turn is no part of the chat that follows it: both sessions send the same conversation.
    messages = [{"role": "user", "content": question}]
    with_adapter = expected(local_backend, messages, PARAMS, adapter_dir)
    without = expected(local_backend, messages, PARAMS)
    assert with_adapter != without
    assert tuned_reply["output"] == with_adapter
    assert plain_reply["output"] == without


def test_four_chats_at_once_each_get_the_text_they_get_alone(text_api, tiny_mistral, text_runner, local_backend):
    chats = [(f"Question number {n}: what is {n} plus {n}?", {**PARAMS, "seed": n, "max_new_tokens": 16 + 4 * n})
             for n in range(4)]
    sessions = [create_session(text_api, text_api.user, message, model=tiny_mistral, **params)
                for message, params in chats]
    text_runner(text_api, "create", tiny_mistral, "batcher", max_parallel=4)
    for session, (message, params) in zip(sessions, chats, strict=True):
        reply = wait_for_reply(text_api, text_api.user, session["id"], 120)
        assert reply["output"] == expected(local_backend, [{"role": "user", "content": message}], params)
        assert "".join(streamed_text(text_api, session["id"])) == reply["output"]
