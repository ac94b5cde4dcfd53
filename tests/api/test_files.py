"""Files through the worker and session APIs: uploads under a lease, owners only, results keep what they name."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from sqlalchemy import func, select

from helix_api.models import File
from tests.conftest import IMAGE_MODEL, claim

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000185d6d5e00000000049454e44ae426082")


def _image_task(client, user, runner):
    session = client.post("/api/v1/sessions", headers=user, json={
        "mode": "create", "type": "image", "model_name": IMAGE_MODEL, "message": "a red fox"}).json
    claimed = claim(client, runner, model=IMAGE_MODEL, type="image").json
    return session, claimed["task"], claimed["lease"]["token"]


def _upload(client, runner, task_id, token, data=PNG, name="out.png", kind="output"):
    return client.post(f"/api/v1/worker/task/{task_id}/files", headers=runner, content_type="multipart/form-data",
                       data={"lease_token": token, "kind": kind, "file": (io.BytesIO(data), name, "image/png")})


def _complete(client, runner, task_id, token, result):
    return client.post(f"/api/v1/worker/task/{task_id}/complete", headers=runner,
                       json={"lease_token": token, "result": result})


def _files_on_disk(settings) -> list[Path]:
    root = Path(settings["DATA_DIR"]) / "files"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_an_output_is_fetched_by_its_owner_and_no_one_else(client, user, make_user, runner):
    session, task, token = _image_task(client, user, runner)
    uploaded = _upload(client, runner, task["id"], token)
    assert uploaded.status_code == 201, uploaded.json
    ref = uploaded.json["file"]
    assert ref["sha256"] == hashlib.sha256(PNG).hexdigest() and ref["size"] == len(PNG)
    assert _complete(client, runner, task["id"], token, {"text": "", "files": [ref["id"]]}).status_code == 200

    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert [f["id"] for f in reply["files"]] == [ref["id"]]
    got = client.get(reply["files"][0]["url"], headers=user)
    assert got.status_code == 200 and got.data == PNG and got.mimetype == "image/png"

    other = make_user("mallory")
    assert client.get(reply["files"][0]["url"], headers=other).status_code == 404
    assert client.get(f"/api/v1/sessions/{session['id']}/files", headers=other).status_code == 404
    assert client.get(f"/api/v1/sessions/{session['id']}/files/999999", headers=user).status_code == 404
    assert client.get(reply["files"][0]["url"]).status_code == 401


def test_a_stale_lease_cannot_upload_and_nothing_is_kept(client, user, runner, db, settings):
    _, task, token = _image_task(client, user, runner)
    response = _upload(client, runner, task["id"], "l_not-the-token")
    assert response.status_code == 409 and response.json["error"] == "lease_lost"
    with db.orm_read() as s:
        assert s.scalar(select(func.count()).select_from(File)) == 0
    assert _files_on_disk(settings) == []


def test_upload_checks_its_form(client, user, runner):
    _, task, token = _image_task(client, user, runner)
    bad_kind = _upload(client, runner, task["id"], token, kind="dataset")
    assert bad_kind.status_code == 400 and bad_kind.json["field"] == "kind"
    no_file = client.post(f"/api/v1/worker/task/{task['id']}/files", headers=runner,
                          content_type="multipart/form-data", data={"lease_token": token, "kind": "output"})
    assert no_file.status_code == 400 and no_file.json["field"] == "file"
    assert client.post(f"/api/v1/worker/task/{task['id']}/files", headers=user, content_type="multipart/form-data",
                       data={"lease_token": token}).status_code == 403


def test_a_file_over_the_limit_is_refused_and_not_kept(make_client, settings, user, runner):
    client = make_client(MAX_FILE_BYTES=100)
    _, task, token = _image_task(client, user, runner)
    response = _upload(client, runner, task["id"], token, data=b"x" * 5000)
    assert response.status_code == 413
    assert _files_on_disk(settings) == []


def test_a_path_traversal_name_is_stored_safely(client, user, runner, settings):
    _, task, token = _image_task(client, user, runner)
    ref = _upload(client, runner, task["id"], token, name="../../../etc/passwd.png").json["file"]
    assert ref["name"] == "passwd.png"
    stored = _files_on_disk(settings)
    root = (Path(settings["DATA_DIR"]) / "files").resolve()
    assert len(stored) == 1 and stored[0].resolve().is_relative_to(root)


def test_files_a_result_does_not_name_are_dropped(client, user, runner, settings):
    session, task, token = _image_task(client, user, runner)
    kept = _upload(client, runner, task["id"], token, name="a.png").json["file"]
    _upload(client, runner, task["id"], token, name="b.png")
    assert _complete(client, runner, task["id"], token, {"files": [kept["id"]]}).status_code == 200
    listed = client.get(f"/api/v1/sessions/{session['id']}/files", headers=user).json["files"]
    assert [f["id"] for f in listed] == [kept["id"]]
    assert len(_files_on_disk(settings)) == 1


def test_a_result_naming_a_file_it_did_not_upload_is_refused(client, user, runner):
    _, task, token = _image_task(client, user, runner)
    response = _complete(client, runner, task["id"], token, {"files": [12345]})
    assert response.status_code == 400 and response.json["field"] == "result.files"


def test_a_runner_downloads_only_with_a_live_lease(client, user, runner):
    _, task, token = _image_task(client, user, runner)
    ref = _upload(client, runner, task["id"], token).json["file"]
    url = f"/api/v1/worker/task/{task['id']}/files/{ref['id']}"
    got = client.get(url, headers={**runner, "X-Helix-Lease": token})
    assert got.status_code == 200 and got.data == PNG
    assert got.headers["X-Helix-SHA256"] == ref["sha256"]
    assert client.get(url, headers=runner).status_code == 400
    assert client.get(url, headers={**runner, "X-Helix-Lease": "l_wrong"}).status_code == 409


def _fail(client, runner, task_id, token, retry):
    return client.post(f"/api/v1/worker/task/{task_id}/fail", headers=runner,
                       json={"lease_token": token, "error": "out of memory", "retry": retry})


def test_a_failed_task_keeps_its_last_attempts_files_on_the_error_reply(client, user, runner, settings):
    session, task, token = _image_task(client, user, runner)
    first = _upload(client, runner, task["id"], token, name="attempt1.png").json["file"]
    assert _fail(client, runner, task["id"], token, retry=True).json["status"] == "queued"
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert [f["id"] for f in reply["files"]] == [first["id"]]  # kept until the task ends one way or another

    again = claim(client, runner, model=IMAGE_MODEL, type="image").json
    token2 = again["lease"]["token"]
    second = _upload(client, runner, task["id"], token2, data=PNG + b"2", name="attempt2.png").json["file"]
    assert _fail(client, runner, task["id"], token2, retry=False).json["status"] == "failed"

    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["state"] == "error" and "out of memory" in reply["error"]
    assert [f["id"] for f in reply["files"]] == [second["id"]]
    assert client.get(reply["files"][0]["url"], headers=user).data == PNG + b"2"
    assert len(_files_on_disk(settings)) == 1  # the first attempt's bytes are gone too


def _two_attempts_then_expired(client, user, runner, db) -> tuple[dict, dict, dict, dict]:
    """An image task whose first attempt uploaded a file and failed, and whose second attempt uploaded
    one and then lost its runner (its lease has run out, not yet reaped): session, task, both files."""
    from helix_api.models import Task, utcnow

    session, task, token = _image_task(client, user, runner)
    first = _upload(client, runner, task["id"], token, name="attempt1.png").json["file"]
    with db.orm_write() as s:
        s.get(Task, task["id"]).max_attempts = 2
    assert _fail(client, runner, task["id"], token, retry=True).json["status"] == "queued"
    token2 = claim(client, runner, model=IMAGE_MODEL, type="image").json["lease"]["token"]
    second = _upload(client, runner, task["id"], token2, name="attempt2.png").json["file"]
    with db.orm_write() as s:  # the runner dies: its lease runs out
        s.get(Task, task["id"]).lease_expires_at = utcnow()
    return session, task, first, second


def test_a_task_that_dies_keeps_its_last_attempts_files(app, client, user, runner, db, settings):
    from helix_api.services import services

    session, task, _, second = _two_attempts_then_expired(client, user, runner, db)
    with app.app_context():
        assert services().scheduler.reap() == 1

    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["state"] == "error" and reply["task"]["status"] == "dead"
    assert [f["id"] for f in reply["files"]] == [second["id"]]
    assert len(_files_on_disk(settings)) == 1  # the first attempt's bytes are gone too
