"""Preference fine-tunes (DPO, reward models): comparisons checked before anything is stored; a completed
reward model scores candidate replies through a task of its own kind (`score`)."""

from __future__ import annotations

import json
import threading

from tests.api.test_finetune import _finish_training, counts, start_finetune
from tests.conftest import TEXT_MODEL, claim


def comparisons(n: int, **extra) -> bytes:
    lines = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}. Stay curious!", "rejected": f"Answer {i}.", **extra}
             for i in range(n)]
    return "\n".join(json.dumps(line) for line in lines).encode()


def test_a_dpo_fine_tune_takes_comparisons_in_either_shape_normalised_for_the_runner(client, user, runner, db):
    chat = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
            "chosen": {"role": "assistant", "content": "Hello! Stay curious!"}, "rejected": "Hello."}
    body = comparisons(10) + b"\n" + json.dumps(chat).encode()
    response = start_finetune(client, user, [("pairs.jsonl", body)], params={"method": "dpo", "beta": 0.2})
    assert response.status_code == 201, response.json
    assert "(dpo) on 11 comparisons" in response.json["name"]
    claimed = claim(client, runner, mode="finetune").json
    assert claimed["task"]["params"] == {"method": "dpo", "beta": 0.2}
    [ref] = claimed["task"]["input"]["files"]
    fetched = client.get(f"/api/v1/worker/task/{claimed['task']['id']}/files/{ref['id']}",
                         headers={**runner, "X-Helix-Lease": claimed["lease"]["token"]})
    assert fetched.status_code == 200, fetched.json
    rows = [json.loads(line) for line in fetched.data.splitlines()]
    assert rows[0] == {"messages": [{"role": "user", "content": "Question 0?"}], "chosen": "Answer 0. Stay curious!",
                       "rejected": "Answer 0."}
    assert rows[-1] == {"messages": chat["messages"], "chosen": "Hello! Stay curious!", "rejected": "Hello."}


def test_bad_comparisons_are_refused_naming_every_line_and_nothing_is_stored(client, user, db, settings):
    before = counts(db, settings)
    bad = b"\n".join([
        comparisons(10),
        json.dumps({"prompt": "Q?", "chosen": "A"}).encode(),
        json.dumps({"prompt": "Q?", "chosen": "Same", "rejected": "Same"}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                    "chosen": "x", "rejected": "y"}).encode(),
        json.dumps({"prompt": "", "chosen": "x", "rejected": "y"}).encode(),
        json.dumps({"prompt": "Q?", "chosen": {"role": "user", "content": "x"}, "rejected": "y"}).encode(),
        b"{not json",
    ])
    response = start_finetune(client, user, [("pairs.jsonl", bad)], params={"method": "reward_model"})
    assert response.status_code == 400 and response.json["error"] == "invalid_training_data"
    assert [p["line"] for p in response.json["problems"]] == [11, 12, 13, 14, 15, 16]
    messages = [p["message"] for p in response.json["problems"]]
    assert "needs 'chosen' and 'rejected'" in messages[0] and "the same reply" in messages[1]
    assert "must end with the user's turn" in messages[2] and "'prompt'" in messages[3]
    assert "the assistant's reply" in messages[4] and "not valid JSON" in messages[5]
    few = start_finetune(client, user, [("pairs.jsonl", comparisons(3))], params={"method": "dpo"})
    assert few.status_code == 400 and "only 3 comparisons; at least 10" in few.json["message"]
    # Chats are not comparisons, nor the other way round.
    sft_shaped = start_finetune(client, user, [("chats.jsonl", comparisons(12))])
    assert sft_shaped.status_code == 400
    unknown = start_finetune(client, user, [("pairs.jsonl", comparisons(12))], params={"method": "ppo"})
    assert unknown.status_code == 400 and unknown.json["field"] == "params.method"
    assert counts(db, settings) == before


def _reward_model(client, user, runner) -> int:
    session = start_finetune(client, user, [("pairs.jsonl", comparisons(10))], params={"method": "reward_model"}).json
    _finish_training(client, runner, claim(client, runner, mode="finetune").json)
    return session["id"]


def test_a_reward_model_scores_candidates_through_a_score_task(client, user, runner):
    session_id = _reward_model(client, user, runner)
    # A reward model does not chat.
    said = client.post(f"/api/v1/sessions/{session_id}/messages", headers=user, json={"message": "hi"})
    assert said.status_code == 409 and "scores replies" in said.json["message"]
    # Nor is it a chat model under /v1.
    assert all(not m["id"].startswith("ft:") for m in client.get("/v1/models", headers=user).json["data"])
    ft = client.post("/v1/chat/completions", headers=user, json={
        "model": f"ft:{TEXT_MODEL}:{session_id}", "messages": [{"role": "user", "content": "hi"}]})
    assert ft.status_code == 404 and ft.json["error"]["code"] == "model_not_found"
    # Nothing to score yet: a chat runner never gets a score task.
    assert claim(client, runner).status_code == 204

    seen = {}

    def score_runner():
        for _ in range(300):
            response = claim(client, runner, mode="score", wait=1)
            if response.status_code == 200:
                task, token = response.json["task"], response.json["lease"]["token"]
                seen["task"] = task
                client.post(f"/api/v1/worker/task/{task['id']}/complete", headers=runner, json={
                    "lease_token": token, "result": {"text": "scores", "scores": [0.5, 2.0, -1.0]}})
                return

    thread = threading.Thread(target=score_runner)
    thread.start()
    response = client.post(f"/api/v1/sessions/{session_id}/score", headers=user,
                           json={"prompt": "Which?", "candidates": ["a", "b", "c"]})
    thread.join()
    assert response.status_code == 200, response.json
    assert response.json["scores"] == [0.5, 2.0, -1.0] and response.json["best"] == 1
    task = seen["task"]
    assert task["mode"] == "score" and task["model_name"] == TEXT_MODEL
    assert task["input"]["prompt"] == "Which?" and task["input"]["candidates"] == ["a", "b", "c"]
    assert task["adapter"] is not None
    shown = client.get(f"/api/v1/sessions/{session_id}", headers=user).json
    assert shown["interactions"][-1]["output"] == "scores" and shown["mode"] == "create"


def test_scoring_needs_a_completed_reward_model_and_a_well_formed_request(client, user, runner, make_user):
    chat = client.post("/api/v1/sessions", headers=user, json={"model_name": TEXT_MODEL, "message": "hi"}).json
    not_rm = client.post(f"/api/v1/sessions/{chat['id']}/score", headers=user,
                         json={"prompt": "p", "candidates": ["a"]})
    assert not_rm.status_code == 409 and not_rm.json["error"] == "not_ready"
    session_id = _reward_model(client, user, runner)
    for body, field in [({"prompt": "", "candidates": ["a"]}, "prompt"),
                        ({"prompt": "p", "candidates": []}, "candidates"),
                        ({"prompt": "p", "candidates": ["a", 3]}, "candidates[1]"),
                        ({"prompt": "p", "candidates": ["a"] * 17}, "candidates"),
                        ({"prompt": "p", "candidates": ["a"], "n": 2}, "n")]:
        response = client.post(f"/api/v1/sessions/{session_id}/score", headers=user, json=body)
        assert response.status_code == 400 and response.json["field"] == field, response.json
    stranger = client.post(f"/api/v1/sessions/{session_id}/score", headers=make_user("mallory"),
                           json={"prompt": "p", "candidates": ["a"]})
    assert stranger.status_code == 404
    assert claim(client, runner, mode="score").status_code == 204  # nothing was queued
