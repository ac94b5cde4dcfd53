"""Fine-tune sessions: training data checked up front, the adapter attached, the session switched to inference."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from helix_api.models import File, Interaction, Session, Task
from tests.conftest import IMAGE_MODEL, TEXT_MODEL, claim


def chats(n: int) -> bytes:
    """n training examples, half chats and half question/answer pairs."""
    lines = []
    for i in range(n):
        if i % 2:
            lines.append({"question": f"What is {i}?", "answer": f"It is {i}."})
        else:
            lines.append({"messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": f"Say {i}"},
                                       {"role": "assistant", "content": f"{i}"}]})
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def png(width: int = 16, height: int = 16, colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def start_finetune(client, headers, files, *, type_="text", model=TEXT_MODEL, params=None, **form):
    data = {"mode": "finetune", "type": type_, "model_name": model, **form,
            "files": [(io.BytesIO(content), name) for name, content in files]}
    if params is not None:
        data["params"] = json.dumps(params)
    return client.post("/api/v1/sessions", headers=headers, data=data, content_type="multipart/form-data")


def counts(db, settings) -> tuple[int, ...]:
    with db.orm_read() as s:
        rows = tuple(s.scalar(select(func.count()).select_from(m)) for m in (Session, Interaction, Task, File))
    root = Path(settings["DATA_DIR"]) / "files"
    return (*rows, len([p for p in root.rglob("*") if p.is_file()]) if root.exists() else 0)


def _finish_training(client, runner, claimed, adapter=b"PK\x05\x06" + b"\x00" * 18):
    task, token = claimed["task"], claimed["lease"]["token"]
    uploaded = client.post(f"/api/v1/worker/task/{task['id']}/files", headers=runner,
                           content_type="multipart/form-data",
                           data={"lease_token": token, "kind": "adapter",
                                 "file": (io.BytesIO(adapter), "adapter.zip", "application/zip")})
    assert uploaded.status_code == 201, uploaded.json
    ref = uploaded.json["file"]
    done = client.post(f"/api/v1/worker/task/{task['id']}/complete", headers=runner, json={
        "lease_token": token, "result": {"text": "trained", "adapter_file_id": ref["id"], "steps": 3}})
    assert done.status_code == 200, done.json
    return ref


def test_text_finetune_end_to_end_through_the_api(client, user, runner):
    created = start_finetune(client, user, [("data.jsonl", chats(12))], params={"max_steps": 3, "lora_r": 4})
    assert created.status_code == 201, created.json
    session = created.json
    assert session["mode"] == "finetune" and session["state"] == "queued"
    assert [f["name"] for f in session["interactions"][0]["files"]] == ["data.jsonl", "train.jsonl"]

    assert claim(client, runner).status_code == 204  # an inference runner never gets training work
    claimed = claim(client, runner, mode="finetune").json
    task = claimed["task"]
    assert task["mode"] == "finetune" and task["params"] == {"max_steps": 3, "lora_r": 4}
    assert task["input"]["examples"] == 12 and [f["name"] for f in task["input"]["files"]] == ["train.jsonl"]
    dataset = client.get(f"/api/v1/worker/task/{task['id']}/files/{task['input']['files'][0]['id']}",
                         headers={**runner, "X-Helix-Lease": claimed["lease"]["token"]})
    lines = [json.loads(line) for line in dataset.data.decode().splitlines()]
    assert len(lines) == 12 and all(set(line) == {"messages"} for line in lines)
    assert lines[1]["messages"] == [{"role": "user", "content": "What is 1?"},
                                    {"role": "assistant", "content": "It is 1."}]

    ref = _finish_training(client, runner, claimed)
    shown = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json
    assert shown["mode"] == "create" and shown["interactions"][-1]["state"] == "complete"
    assert any(f["kind"] == "adapter" for f in shown["interactions"][-1]["files"])

    asked = client.post(f"/api/v1/sessions/{session['id']}/messages", headers=user,
                        json={"message": "Say 3", "params": {"seed": 1}})
    assert asked.status_code == 201, asked.json
    inference = claim(client, runner).json
    # The training turn taught the adapter; it is no part of the chat that follows.
    assert inference["task"]["input"]["messages"] == [{"role": "user", "content": "Say 3"}]
    assert inference["task"]["adapter"]["id"] == ref["id"]
    assert inference["task"]["adapter"]["sha256"] == ref["sha256"]
    got = client.get(f"/api/v1/worker/task/{inference['task']['id']}/files/{ref['id']}",
                     headers={**runner, "X-Helix-Lease": inference["lease"]["token"]})
    assert got.status_code == 200


def test_a_chat_without_a_fine_tune_never_gets_an_adapter(client, user, runner):
    client.post("/api/v1/sessions", headers=user, json={"model_name": TEXT_MODEL, "message": "hi"})
    task = claim(client, runner).json["task"]
    assert task["adapter"] is None and task["input"]["adapter"] is None


def test_a_finetune_takes_no_messages_until_it_completes(client, user):
    session = start_finetune(client, user, [("d.jsonl", chats(10))]).json
    response = client.post(f"/api/v1/sessions/{session['id']}/messages", headers=user, json={"message": "hi"})
    assert response.status_code == 409 and response.json["error"] == "not_ready"


def test_a_finetune_result_must_name_its_adapter(client, user, runner):
    start_finetune(client, user, [("d.jsonl", chats(10))])
    claimed = claim(client, runner, mode="finetune").json
    response = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                           json={"lease_token": claimed["lease"]["token"], "result": {"text": "done"}})
    assert response.status_code == 400 and response.json["field"] == "result.adapter_file_id"


def test_json_cannot_start_a_finetune(client, user):
    response = client.post("/api/v1/sessions", headers=user, json={
        "mode": "finetune", "model_name": TEXT_MODEL, "message": "train"})
    assert response.status_code == 400 and "multipart/form-data" in response.json["message"]


BAD_TEXT = [
    ([("d.jsonl", chats(10) + b"{not json\n")], ["d.jsonl:11"], "not valid JSON"),
    ([("d.jsonl", chats(10) + b'{"messages": [{"role": "robot", "content": "x"}]}\n')], ["d.jsonl:11"],
     "unknown role 'robot'"),
    ([("d.jsonl", chats(10) + b'{"question": "only a question"}\n' + b'{"foo": 1}\n')],
     ["d.jsonl:11", "d.jsonl:12"], "'question' and 'answer'"),
    ([("d.jsonl", chats(9))], [], "at least 10 are needed"),
    ([("d.csv", b"a,b\n")], ["d.csv"], "not a JSONL file"),
    ([("d.jsonl", b"\xff\xfe\n" + chats(10))], ["d.jsonl:1"], "UTF-8"),
    ([], [], "no training files"),
]


@pytest.mark.parametrize("files,where,needle", BAD_TEXT)
def test_bad_text_data_is_refused_naming_lines_and_nothing_is_stored(client, user, db, settings, files, where,
                                                                      needle):
    before = counts(db, settings)
    response = start_finetune(client, user, files)
    assert response.status_code == 400, response.json
    body = response.json
    assert body["error"] == "invalid_training_data" and needle in body["message"], body
    for place in where:
        assert place in body["message"]
    assert counts(db, settings) == before


def test_image_finetune_pairs_images_with_captions(client, user, runner):
    captions = json.dumps({"b.png": "blue", "c.png": "green"}).encode()
    files = [("a.png", png()), ("a.txt", b"a red square"), ("b.png", png(colour="blue")),
             ("c.png", png(colour="green")), ("captions.json", captions)]
    created = start_finetune(client, user, files, type_="image", model=IMAGE_MODEL, params={"max_steps": 2})
    assert created.status_code == 201, created.json
    task = claim(client, runner, model=IMAGE_MODEL, type="image", mode="finetune").json["task"]
    assert sorted(f["name"] for f in task["input"]["files"]) == ["a.png", "b.png", "c.png"]
    assert {f["content_type"] for f in task["input"]["files"]} == {"image/png"}
    assert task["input"]["captions"] == {"a.png": "a red square", "b.png": "blue", "c.png": "green"}


BAD_IMAGES = [
    ([("a.png", b"this is not a png"), ("a.txt", b"x")], "a.png", "not a readable image"),
    ([("a.png", png())], "a.png", "no caption"),
    ([("a.png", png()), ("a.txt", b"x"), ("z.txt", b"lonely")], "z.txt", "no image of the same name"),
    ([("a.png", png()), ("a.txt", b"x"), ("run.sh", b"rm -rf /")], "run.sh", "neither an image"),
    ([("a.png", png()), ("a.txt", b"x"), ("b.png", png()), ("b.txt", b"y")], "files", "at least 3 are needed"),
    ([("big.png", png(80, 20)), ("big.txt", b"x")], "big.png", "at most 64 pixels a side"),
    ([("a.png", png()), ("captions.json", b"[1, 2]")], "captions.json", "captions JSON must be an object"),
    ([("a.jpg", png()), ("a.txt", b"x")], "a.jpg", "holds PNG data"),
]


@pytest.mark.parametrize("files,name,needle", BAD_IMAGES)
def test_bad_images_are_refused_naming_the_file_and_nothing_is_stored(make_client, settings, user, db, files, name,
                                                                      needle):
    client = make_client(MAX_TRAINING_IMAGE_SIDE=64)
    before = counts(db, settings)
    response = start_finetune(client, user, files, type_="image", model=IMAGE_MODEL)
    assert response.status_code == 400, response.json
    assert response.json["error"] == "invalid_training_data"
    assert name in response.json["message"] and needle in response.json["message"], response.json
    assert any(p["file"] == name for p in response.json["problems"])
    assert counts(db, settings) == before


def test_a_path_traversal_upload_is_stored_under_a_safe_name(client, user, settings):
    files = [("../../../../tmp/evil.png", png()), ("../../../../tmp/evil.txt", b"evil"),
             ("b.png", png()), ("b.txt", b"b"), ("c.png", png()), ("c.txt", b"c")]
    created = start_finetune(client, user, files, type_="image", model=IMAGE_MODEL)
    assert created.status_code == 201, created.json
    names = [f["name"] for f in created.json["interactions"][0]["files"]]
    assert "evil.png" in names and not any("/" in n or ".." in n for n in names)
    root = (Path(settings["DATA_DIR"]) / "files").resolve()
    assert all(p.resolve().is_relative_to(root) for p in root.rglob("*"))
    assert not Path("/tmp/evil.png").exists()


def test_finetune_params_are_checked(client, user, db, settings):
    before = counts(db, settings)
    response = start_finetune(client, user, [("d.jsonl", chats(10))], params={"learning_rate": -1})
    assert response.status_code == 400 and response.json["field"] == "params.learning_rate"
    response = start_finetune(client, user, [("d.jsonl", chats(10))], params={"temperature": 1})
    assert response.status_code == 400 and "Unknown param" in response.json["message"]
    assert counts(db, settings) == before
