"""The `helix` command."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from helix_api.cli.operator import main


@pytest.fixture
def cli(database_url, monkeypatch, tmp_path):
    monkeypatch.setenv("HELIX_DATABASE_URL", database_url)
    monkeypatch.setenv("HELIX_DATA_DIR", str(tmp_path))

    def run(*args: str, ok: bool = True):
        result = CliRunner().invoke(main, list(args))
        if ok:
            assert result.exit_code == 0, result.output
        return result
    return run


def test_users_create_prints_key_last(cli, app, client):
    result = cli("users", "create", "erin")
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("hx_")
    assert client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_duplicate_user_is_a_clear_error(cli):
    cli("users", "create", "erin")
    result = cli("users", "create", "erin", ok=False)
    assert result.exit_code != 0 and "exists already" in result.output


def test_a_user_gets_another_key_and_a_revoked_key_is_refused(cli, client):
    first = cli("users", "create", "erin").stdout.strip().splitlines()[-1]
    second = cli("users", "new-key", "erin").stdout.strip().splitlines()[-1]
    assert second.startswith("hx_") and second != first
    assert "no user called" in cli("users", "new-key", "nobody", ok=False).output

    assert client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {first}"}).status_code == 200
    # This process trusted the key for AUTH_CACHE_SECONDS; revoking it here forgets it at once.
    assert "revoked 1 API key" in cli("users", "revoke-key", first[:10]).output
    assert client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {first}"}).status_code == 401
    assert client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    assert "no live API key" in cli("users", "revoke-key", first[:10], ok=False).output


def test_runner_token_create_prints_token_last(cli, client, task_factory):
    token = cli("runner-token", "create", "--name", "gpu1").stdout.strip().splitlines()[-1]
    assert token.startswith("hxr_")
    task_factory()
    response = client.get("/api/v1/worker/task", query_string={"model_name": task_factory()["model_name"]},
                          headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


def test_tasks_list_filters_by_status(cli, task_factory, client, runner):
    task_factory()
    task_factory()
    client.get("/api/v1/worker/task", query_string={"model_name": task_factory()["model_name"]}, headers=runner)
    everything = cli("tasks", "list").stdout
    assert everything.count("queued") == 2 and everything.count("claimed") == 1
    only = cli("tasks", "list", "--status", "claimed").stdout
    assert "claimed" in only and "queued" not in only


def test_tasks_reap_ends_an_expired_task_and_deletes_its_earlier_attempts_files(cli, client, user, runner, db,
                                                                                 settings):
    from helix_api.models import File, Task, TaskStatus
    from tests.api.test_files import _two_attempts_then_expired

    _, task, first, second = _two_attempts_then_expired(client, user, runner, db)
    with db.orm_read() as s:
        paths = {f.id: Path(settings["DATA_DIR"]) / "files" / f.path for f in s.query(File)}
    assert paths[first["id"]].is_file() and paths[second["id"]].is_file()

    assert "reaped 1 task(s)" in cli("tasks", "reap").output
    with db.orm_read() as s:
        assert s.get(Task, task["id"]).status == TaskStatus.DEAD
    assert not paths[first["id"]].exists()  # the dropped attempt's bytes, not only its row
    assert paths[second["id"]].is_file()  # the last attempt's stay with the error reply


def test_commands_refuse_an_old_schema(monkeypatch, tmp_path):
    monkeypatch.setenv("HELIX_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    result = CliRunner().invoke(main, ["users", "create", "x"])
    assert result.exit_code != 0 and "helix db upgrade" in result.output


def test_db_upgrade_brings_a_fresh_database_to_head(monkeypatch, tmp_path):
    monkeypatch.setenv("HELIX_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    result = CliRunner().invoke(main, ["db", "upgrade"])
    from helix_api.ops.schema_version import head_revision

    assert result.exit_code == 0 and f"revision {head_revision()}" in result.stdout
    assert CliRunner().invoke(main, ["users", "create", "x"]).exit_code == 0


def test_task_statuses_match_the_model():
    from helix_api.cli.operator import TASK_STATUSES
    from helix_api.models import TaskStatus

    assert TASK_STATUSES == tuple(s.value for s in TaskStatus)


def test_db_check_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("HELIX_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    result = CliRunner().invoke(main, ["db", "check"])
    assert result.exit_code != 0 and "helix db upgrade" in result.output


@pytest.mark.parametrize("models,said", [
    ("text:sdxl-base=org/llm", "the alias 'sdxl-base' of 'org/llm' clashes with the alias of "
                               "'stabilityai/stable-diffusion-xl-base-1.0'"),
    ("text:my llm=org/llm", "the alias 'my llm' of 'org/llm' may hold only letters, digits"),
])
def test_serve_refuses_a_clashing_or_unsafe_alias_in_one_line(cli, app, monkeypatch, models, said):
    monkeypatch.setenv("HELIX_MODELS", models)
    result = cli("serve", "--port", "1", ok=False)
    assert result.exit_code == 1 and said in result.output and "Traceback" not in result.output
