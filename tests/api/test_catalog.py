"""Model aliases through the API: the session API, /v1 (with the official `openai` client), a runner's claim
URL, and what every list shows; a model configured by path is never shown by it. The catalog's own rules
(syntax, clashes, characters) are in tests/api/test_config.py."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.test_openai import FakeRunner, in_background
from tests.conftest import TEXT_ALIAS, TEXT_MODEL, bearer, claim

SMOL, SMOL_ALIAS = "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"


@pytest.fixture(autouse=True)
def sdxl_path(settings, tmp_path) -> str:
    """The API offers SmolLM2 by an alias and a tiny SDXL by its path alone (so by its directory's name)."""
    path = str(tmp_path / "models" / "tiny-sdxl")
    settings["MODELS"] = f"text:{SMOL_ALIAS}={SMOL},image:{path}"
    return path


def test_a_session_named_by_alias_queues_the_full_name_and_a_runner_claims_it_by_alias(client, user, runner, db):
    created = client.post("/api/v1/sessions", headers=user, json={
        "mode": "create", "type": "text", "model_name": SMOL_ALIAS, "message": "hi"})
    assert created.status_code == 201, created.json
    assert created.json["model_name"] == SMOL_ALIAS
    with db.connect() as conn:
        assert conn.exec_driver_sql("SELECT model_name FROM tasks").scalar() == SMOL  # what runners load

    # A runner whose claim URL names the alias gets the task, which carries the full name to load.
    claimed = claim(client, runner, model=SMOL_ALIAS)
    assert claimed.status_code == 200, claimed.data
    assert claimed.json["task"]["model_name"] == SMOL and claimed.json["task"]["session_id"] == created.json["id"]

    # The full name is still taken, and the session reads back by the alias either way.
    again = client.post("/api/v1/sessions", headers=user, json={
        "mode": "create", "type": "text", "model_name": SMOL, "message": "hi"})
    assert again.status_code == 201 and again.json["model_name"] == SMOL_ALIAS
    listed = client.get("/api/v1/sessions", headers=user).json["sessions"]
    assert {s["model_name"] for s in listed} == {SMOL_ALIAS}


def test_a_model_configured_by_path_is_shown_by_its_directory_name_and_never_by_the_path(client, user, runner,
                                                                                      sdxl_path):
    created = client.post("/api/v1/sessions", headers=user, json={
        "mode": "create", "type": "image", "model_name": "tiny-sdxl", "message": "a fox"})
    assert created.status_code == 201, created.json
    seen = [created, client.get("/api/v1/models", headers=user), client.get("/v1/models", headers=user),
            client.get("/api/v1/sessions", headers=user), client.get(f"/api/v1/sessions/{created.json['id']}",
                                                                   headers=user),
            client.get("/api/v1/models/tiny-sdxl", headers=user), client.get("/api/v1/usage", headers=user),
            client.post("/api/v1/sessions", headers=user, json={
                "mode": "create", "type": "image", "model_name": "nope", "message": "a fox"})]
    for response in seen:
        assert sdxl_path not in response.get_data(as_text=True), response.request.path
    models = {m["name"]: m for m in seen[1].json["models"]}
    assert models["tiny-sdxl"] == {"name": "tiny-sdxl", "type": "image", "alias": "tiny-sdxl", "full_name": None}
    assert models[SMOL_ALIAS]["full_name"] == SMOL and models[TEXT_ALIAS]["full_name"] == TEXT_MODEL
    assert seen[-1].status_code == 400 and "offered: sdxl-base, tiny-sdxl" in seen[-1].json["message"]

    # A runner loads the weights by the full name, so the API tells it what the alias names.
    for_runner = client.get("/api/v1/models/tiny-sdxl", headers=runner)
    assert for_runner.status_code == 200 and for_runner.json["full_name"] == sdxl_path
    unknown = client.get("/api/v1/models/no-such-model", headers=runner)
    assert unknown.status_code == 404 and "'no-such-model'" in unknown.json["message"]


def test_the_official_openai_client_lists_aliases_and_chats_by_one(app, user, runner):
    key = user["Authorization"].removeprefix("Bearer ")
    # In process: the client's own HTTP stack (httpx) against the app, no server.
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://helix.test") as http:
        client = openai.OpenAI(base_url="http://helix.test/v1", api_key=key, http_client=http, max_retries=0)
        ids = {m.id for m in client.models.list()}
        assert {SMOL_ALIAS, TEXT_ALIAS, "sdxl-base", "tiny-sdxl"} <= ids
        assert not {SMOL, TEXT_MODEL} & ids and not any(i.startswith("/") for i in ids)
        assert client.models.retrieve(SMOL_ALIAS).id == SMOL_ALIAS

        fake = FakeRunner(app, runner)
        answered: dict = {}

        def serve() -> None:
            task, token = fake.claim(model=SMOL_ALIAS)  # the runner's URL names the alias too
            answered["model_name"] = task["model_name"]
            fake.post(task, "complete", lease_token=token, result={"text": "Hi!", "finish_reason": "stop"})

        with in_background(serve):
            reply = client.chat.completions.create(model=SMOL_ALIAS, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Hi!" and reply.model == SMOL_ALIAS
        assert answered["model_name"] == SMOL

        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}])
        assert f"offered: {TEXT_ALIAS}, {SMOL_ALIAS}" in missing.value.message


def test_the_web_forms_offer_and_take_aliases(app, db, make_user):
    from tests.web.conftest import sign_in, submit

    browser = app.test_client()
    assert sign_in(browser, make_user("dora")["Authorization"].removeprefix("Bearer ")).status_code == 302
    page = browser.get("/new/image").get_data(as_text=True)
    assert '<option value="tiny-sdxl"' in page and "/models/tiny-sdxl" not in page
    made = submit(browser, "/new/chat", {"model_name": SMOL_ALIAS, "message": "hello"})
    assert made.status_code == 302, made.get_data(as_text=True)[:500]
    listing = browser.get("/").get_data(as_text=True)
    assert f'data-model="{SMOL_ALIAS}"' in listing and SMOL not in listing


def test_looking_up_an_unknown_model_is_a_404_naming_it(client, user):
    response = client.get("/api/v1/models/a%20b", headers=user)
    assert response.status_code == 404 and "'a b'" in response.json["message"]


def test_a_runner_token_or_user_key_is_needed_to_look_a_model_up(client):
    assert client.get(f"/api/v1/models/{SMOL_ALIAS}").status_code == 401
    assert client.get(f"/api/v1/models/{SMOL_ALIAS}", headers=bearer("hx_nope")).status_code == 401
