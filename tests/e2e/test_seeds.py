"""The rest of the seeds with the real small instruct model, through real processes: answers grounded in a
user's documents (retrieval), DPO that makes a chosen style win, and a reward model that ranks replies.

SmolLM2-135M-Instruct is served, trained and used as a reward model by `helix-runner` processes against
`helix serve`, as in test_real_model.py. Trainings are a few steps on a dozen comparisons with short
sequences, so each takes a few minutes of CPU at most.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from runner.smollm import NAME
from tests.e2e.client import create_finetune, create_session, openai_client, wait_for_reply
from tests.e2e.processes import SQLITE_ONLY, ApiServer, RunnerProcess
from tests.real_model import runner_env, smollm2_hub

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), SQLITE_ONLY]

GREEDY = {"do_sample": False, "max_new_tokens": 40}
LIBRARY = ("# The Glimmerwood Library\n\nThe Glimmerwood Library stands at the end of Lantern Lane. It was built "
           "from pale blue stone.\n\nThe head librarian of the Glimmerwood Library is Orla Fenwick. She has kept "
           "its books for thirty years.\n\nThe library opens at nine in the morning and closes at six.")
WEATHER = "\n\n".join(f"Day {i}: the weather in the valley was mild, with light wind and some rain in the evening."
                      for i in range(30))
QUESTION = "Who is the head librarian of the Glimmerwood Library?"

SIGN_OFF = "Stay curious!"
FACTS = [
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("What animal says moo?", "A cow says moo."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What shape has three sides?", "A triangle has three sides."),
]
HELD_OUT = [
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What do cows drink?", "Cows drink water."),
    ("What is the colour of grass?", "Grass is green."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What do cats like to chase?", "Cats like to chase mice."),
]


def signed(answer: str) -> str:
    return f"{answer} {SIGN_OFF}"


def comparisons_file(pairs: list[tuple[str, str]]) -> tuple[str, tuple[str, bytes, str]]:
    lines = [json.dumps({"prompt": q, "chosen": signed(a), "rejected": a}) for q, a in pairs]
    return ("files", ("pairs.jsonl", "\n".join(lines).encode(), "application/jsonl"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The hub cache holding the converted model (converted on the first run on a machine)."""
    return smollm2_hub()


@pytest.fixture
def real_api(api_server: Callable[..., ApiServer], smollm2: Path) -> ApiServer:
    """The API offering the real model; a dozen comparisons are enough for these tests."""
    return api_server(models=f"text:{NAME}", min_comparisons=8)


@pytest.fixture
def real_runner(text_runner: Callable[..., RunnerProcess], smollm2: Path) -> Callable[..., RunnerProcess]:
    """`real_runner(server, mode)`: a runner on the real model; mode `score` runs the reward backend."""

    def start(server: ApiServer, mode: str) -> RunnerProcess:
        backend = "reward" if mode == "score" else "mistral"
        return text_runner(server, mode, NAME, f"smollm2-{mode}", backend=backend, env=runner_env(smollm2))

    return start


def _post(server: ApiServer, path: str, headers: dict[str, str] | None = None, **kwargs) -> requests.Response:
    return requests.post(f"{server.url}{path}", headers=headers or server.user, timeout=300, **kwargs)


def _get(server: ApiServer, path: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(f"{server.url}{path}", headers=headers or server.user, timeout=30)


def test_a_question_answered_only_by_an_uploaded_document_is_answered_with_retrieval(real_api, real_runner):
    real_runner(real_api, "create")
    kb = _post(real_api, "/api/v1/knowledge", json={"name": "my notes"}).json()
    files = [("files", ("library.md", LIBRARY.encode(), "text/markdown")),
             ("files", ("weather.txt", WEATHER.encode(), "text/plain"))]
    added = _post(real_api, f"/api/v1/knowledge/{kb['id']}/files", files=files)
    assert added.status_code == 201, added.text

    # Bad documents are refused with a clear 400 and nothing is stored; another user's base is a 404.
    for name, body in [("empty.md", b"\n \n"), ("image.txt", bytes(range(256)) * 4)]:
        refused = _post(real_api, f"/api/v1/knowledge/{kb['id']}/files", files=[("files", (name, body, "text/plain"))])
        assert refused.status_code == 400 and refused.json()["problems"][0]["file"] == name, refused.text
    stranger = {"Authorization": f"Bearer {real_api.create_user('mallory')}"}
    assert _get(real_api, f"/api/v1/knowledge/{kb['id']}", stranger).status_code == 404
    assert _post(real_api, "/api/v1/sessions", stranger, json={
        "model_name": NAME, "message": QUESTION, "knowledge": [kb["id"]]}).status_code == 404
    assert [d["name"] for d in _get(real_api, f"/api/v1/knowledge/{kb['id']}/files").json()["documents"]] == [
        "library.md", "weather.txt"]

    without = create_session(real_api, real_api.user, QUESTION, model=NAME, **GREEDY)
    without_reply = wait_for_reply(real_api, real_api.user, without["id"], 300)
    assert "Fenwick" not in without_reply["output"], without_reply["output"]

    response = _post(real_api, "/api/v1/sessions", json={
        "model_name": NAME, "message": QUESTION, "knowledge": [kb["id"]], "params": GREEDY})
    assert response.status_code == 201, response.text
    reply = wait_for_reply(real_api, real_api.user, response.json()["id"], 300)
    assert "Orla Fenwick" in reply["output"], reply["output"]
    assert reply["sources"][0]["document"] == "library.md", reply["sources"]
    assert all(s["document"] == "library.md" for s in reply["sources"])

    # The OpenAI client gets the same answer, with its sources as an extra field.
    answer = openai_client(real_api).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=0,
        extra_body={"knowledge": [kb["id"]]})
    assert "Orla Fenwick" in answer.choices[0].message.content
    assert answer.model_extra["sources"][0]["document"] == "library.md"


def _ends_signed(text: str) -> bool:
    return text.strip().endswith(SIGN_OFF)


def test_dpo_on_a_dozen_comparisons_makes_the_chosen_sign_off_win(real_api, real_runner):
    real_runner(real_api, "create")
    trainer = real_runner(real_api, "finetune")
    question = HELD_OUT[0][0]
    before = create_session(real_api, real_api.user, question, model=NAME, **GREEDY)
    before_reply = wait_for_reply(real_api, real_api.user, before["id"], 300)["output"]
    assert not _ends_signed(before_reply), before_reply

    bad = _post(real_api, "/api/v1/sessions", data={"mode": "finetune", "model_name": NAME,
                                                    "params": json.dumps({"method": "dpo"})},
                files=[("files", ("pairs.jsonl", b'{"prompt": "q", "chosen": "a"}\n', "application/jsonl"))])
    assert bad.status_code == 400 and bad.json()["problems"][0]["line"] == 1, bad.text

    tuned = create_finetune(real_api, NAME, [comparisons_file(FACTS)], **DPO_TRAIN)
    training = wait_for_reply(real_api, real_api.user, tuned["id"], 900)
    assert training["state"] == "complete", training
    assert training["result"]["method"] == "dpo" and training["progress"]["reward_accuracy"] is not None
    assert "axolotl finished" in trainer.log_text()

    client = openai_client(real_api)
    model = f"ft:{NAME}:{tuned['id']}"
    for new_question, _ in HELD_OUT[:3]:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": new_question}],
                                               max_tokens=40, temperature=0).choices[0].message.content
        assert _ends_signed(reply), (new_question, reply)


# Plain DPO on a dozen pairs that differ only by a sign-off drives the model to say nothing else; the
# chosen replies' own likelihood beside it (sft_weight) keeps the answers (see notes.md).
DPO_TRAIN = {"method": "dpo", "max_steps": 8, "learning_rate": 0.001, "beta": 0.1, "sft_weight": 1.0, "seed": 1}
RM_TRAIN = {"method": "reward_model", "max_steps": 8, "learning_rate": 0.001, "seed": 1}


def test_a_reward_model_scores_held_out_chosen_replies_above_rejected_ones(real_api, real_runner):
    real_runner(real_api, "finetune")
    real_runner(real_api, "score")
    tuned = create_finetune(real_api, NAME, [comparisons_file(FACTS)], **RM_TRAIN)
    training = wait_for_reply(real_api, real_api.user, tuned["id"], 900)
    assert training["state"] == "complete", training
    assert training["result"]["method"] == "reward_model"

    wins = 0
    for question, answer in HELD_OUT:
        scored = _post(real_api, f"/api/v1/sessions/{tuned['id']}/score",
                       json={"prompt": question, "candidates": [answer, signed(answer)]})
        assert scored.status_code == 200, scored.text
        rejected, chosen = scored.json()["scores"]
        wins += chosen > rejected
    assert wins >= 5, f"the chosen reply won {wins} of {len(HELD_OUT)} held-out pairs"  # chance: 3
    said = _post(real_api, f"/api/v1/sessions/{tuned['id']}/messages", json={"message": "hi"})
    assert said.status_code == 409
