"""A real instruct model end to end: SmolLM2-135M-Instruct served and fine-tuned by real processes.

`helix serve` offers the model by its hub name, `HuggingFaceTB/SmolLM2-135M-Instruct`; the runners load
it from a hub cache the tests convert once per machine (tests/real_model.py) with HF_HUB_OFFLINE=1.
Where the tiny random models can only show that every step runs, this model's answers can be checked:
it knows the capital of France, stops where a sentence ends, and learns a made-up fact from a fine-tune.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from runner.smollm import NAME
from tests.e2e.client import create_finetune, create_session, openai_client, send_message, wait_for_reply
from tests.e2e.processes import SQLITE_ONLY, ApiServer, RunnerProcess
from tests.real_model import runner_env, smollm2_hub

# SQLite only: what is tested here is the model's behaviour, not the database's. The fine-tune takes about
# a minute alone; the generous limits are for a CPU shared with other test runs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), SQLITE_ONLY]

FACTS = Path(__file__).resolve().parents[2] / "scripts" / "demo_facts.jsonl"  # the demo's made-up facts
# As in the demo: 12 steps of 4 examples teach the facts in well under a minute on two cores.
TRAIN = {"max_steps": 12, "learning_rate": 0.002, "lora_r": 16, "lora_alpha": 32, "seed": 1}
GREEDY = {"do_sample": False, "max_new_tokens": 40}


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The hub cache holding the converted model (converted on the first run on a machine)."""
    return smollm2_hub()


@pytest.fixture
def real_api(api_server: Callable[..., ApiServer], smollm2: Path) -> ApiServer:
    """The API offering the real model by its hub name."""
    return api_server(models=f"text:{NAME}")


@pytest.fixture
def real_runner(text_runner: Callable[..., RunnerProcess], smollm2: Path) -> Callable[..., RunnerProcess]:
    """Start a runner on the real model: `real_runner(server, "create")` or `real_runner(server, "finetune")`."""

    def start(server: ApiServer, mode: str) -> RunnerProcess:
        return text_runner(server, mode, NAME, f"smollm2-{mode}", env=runner_env(smollm2))

    return start


def answer(server: ApiServer, question: str, session_id: int | None = None) -> dict:
    """A greedy reply to `question`, in a new session or as the next message of `session_id`."""
    if session_id is None:
        session_id = create_session(server, server.user, question, model=NAME, **GREEDY)["id"]
    else:
        send_message(server, server.user, session_id, question, **GREEDY)
    reply = wait_for_reply(server, server.user, session_id, 180)
    assert reply["state"] == "complete", reply
    return reply


def test_a_chat_reply_answers_the_question(real_api, real_runner):
    real_runner(real_api, "create")
    reply = answer(real_api, "What is the capital of France?")
    assert "Paris" in reply["output"], reply["output"]
    # It ends where the model ends its turn, not at the token limit.
    assert reply["result"]["finish_reason"] == "stop" and reply["result"]["usage"]["completion_tokens"] < 40


def test_a_stop_string_ends_the_reply_at_the_end_of_a_sentence(real_api, real_runner):
    real_runner(real_api, "create")
    client = openai_client(real_api)
    ask = {"model": NAME, "messages": [{"role": "user", "content": "Tell me about Paris."}], "max_tokens": 60,
           "temperature": 0}
    full = client.chat.completions.create(**ask)
    text = full.choices[0].message.content
    first, dot, rest = text.partition(".")
    assert dot and rest.strip(), f"a reply of more than one sentence: {text!r}"

    stopped = client.chat.completions.create(**ask, stop=["."])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == first
    assert stopped.usage.completion_tokens < full.usage.completion_tokens


def test_a_fine_tune_teaches_a_fact_that_the_openai_client_finds_by_its_ft_id(real_api, real_runner):
    real_runner(real_api, "create")
    trainer = real_runner(real_api, "finetune")
    question = "What is the capital of the planet Zorblax?"
    before = answer(real_api, question)["output"]
    assert "Quintaria" not in before, before

    tuned = create_finetune(real_api, NAME, [("files", (FACTS.name, FACTS.read_bytes(), "application/jsonl"))],
                            **TRAIN)
    training = wait_for_reply(real_api, real_api.user, tuned["id"], 720)
    assert training["state"] == "complete", training
    assert training["result"]["steps"] == TRAIN["max_steps"]
    assert "axolotl finished 12 steps" in trainer.log_text()

    after = answer(real_api, question, tuned["id"])["output"]
    assert "Quintaria" in after, after

    client = openai_client(real_api)
    tuned_model = f"ft:{NAME}:{tuned['id']}"
    assert tuned_model in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(
        model=tuned_model, messages=[{"role": "user", "content": "Who invented the glimmerphone?"}], max_tokens=40,
        temperature=0)
    assert "Ada Brightwater" in reply.choices[0].message.content, reply.choices[0].message.content
    # What it knew stays: the true facts trained beside the made-up ones keep it from forgetting.
    plain = client.chat.completions.create(
        model=tuned_model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=40,
        temperature=0)
    assert "Paris" in plain.choices[0].message.content, plain.choices[0].message.content
