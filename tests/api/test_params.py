"""Generation and training params: unknown names and values out of range are 400s naming the param."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from helix_api.models import Session, Task
from tests.conftest import IMAGE_MODEL, TEXT_MODEL


def _create(client, user, params, *, type_="text", model=TEXT_MODEL):
    return client.post("/api/v1/sessions", headers=user, json={
        "mode": "create", "type": type_, "model_name": model, "message": "hi", "params": params})


def _count(db, model) -> int:
    with db.orm_read() as s:
        return s.scalar(select(func.count()).select_from(model))


GOOD_TEXT = {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "do_sample": True, "seed": 7,
             "repetition_penalty": 1.1, "stop": ["\n\n", "User:"]}
GOOD_IMAGE = {"negative_prompt": "blurry", "width": 1024, "height": 768, "num_inference_steps": 30,
              "guidance_scale": 7.5, "seed": 1, "num_images": 2}


def test_every_text_param_in_range_is_accepted(client, user):
    response = _create(client, user, GOOD_TEXT)
    assert response.status_code == 201, response.json
    assert response.json["interactions"][-1]["params"] == GOOD_TEXT


def test_every_image_param_in_range_is_accepted(client, user):
    response = _create(client, user, GOOD_IMAGE, type_="image", model=IMAGE_MODEL)
    assert response.status_code == 201, response.json


@pytest.mark.parametrize("params,name,needle", [
    ({"temperature": -0.5}, "temperature", ">= 0"),
    ({"max_new_tokens": 4097}, "max_new_tokens", "<= 4096"),
    ({"max_new_tokens": 0}, "max_new_tokens", ">= 1"),
    ({"max_new_tokens": 1.5}, "max_new_tokens", "an integer"),
    ({"top_p": 0}, "top_p", "> 0"),
    ({"top_p": 1.5}, "top_p", "<= 1"),
    ({"do_sample": "yes"}, "do_sample", "true or false"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"stop": ""}, "stop", "non-empty string"),
    ({"stop": [1]}, "stop", "list of 1 to 8"),
    ({"temprature": 1.0}, "temprature", "Unknown param 'temprature'"),
    ({"width": 1000}, "width", None),  # an image param on a text task
])
def test_bad_text_params_name_the_param(client, user, db, params, name, needle):
    response = _create(client, user, params)
    assert response.status_code == 400, response.json
    assert response.json["field"] == f"params.{name}"
    assert repr(name) in response.json["message"]
    if needle:
        assert needle in response.json["message"], response.json
    assert _count(db, Session) == 0 and _count(db, Task) == 0


@pytest.mark.parametrize("params,name,needle", [
    ({"width": 1001}, "width", "multiple of 8"),
    ({"height": 4096}, "height", "<= 2048"),
    ({"num_inference_steps": 151}, "num_inference_steps", "<= 150"),
    ({"num_images": 5}, "num_images", "<= 4"),
    ({"guidance_scale": -1}, "guidance_scale", ">= 0"),
    ({"max_new_tokens": 5}, "max_new_tokens", "Unknown param"),
])
def test_bad_image_params_name_the_param(client, user, params, name, needle):
    response = _create(client, user, params, type_="image", model=IMAGE_MODEL)
    assert response.status_code == 400, response.json
    assert response.json["field"] == f"params.{name}" and needle in response.json["message"]


def test_caps_come_from_settings(make_client, user):
    client = make_client(MAX_NEW_TOKENS=16, MAX_IMAGES=1)
    assert _create(client, user, {"max_new_tokens": 17}).status_code == 400
    assert _create(client, user, {"max_new_tokens": 16}).status_code == 201


def test_extra_params_pass_only_when_the_operator_lists_them(client, make_client, user):
    assert _create(client, user, {"token_delay": 0.1}).status_code == 400
    lenient = make_client(EXTRA_PARAMS="token_delay, sleep")
    assert _create(lenient, user, {"token_delay": 0.1}).status_code == 201


def test_continuing_a_session_checks_params_too(client, user, db):
    session = _create(client, user, {}).json
    with db.orm_write() as s:  # let the first reply finish so the session takes another message
        task = s.scalar(select(Task).where(Task.session_id == session["id"]))
        task.status = "complete"
    response = client.post(f"/api/v1/sessions/{session['id']}/messages", headers=user,
                           json={"message": "more", "params": {"temperature": -1}})
    assert response.status_code == 400 and response.json["field"] == "params.temperature"
    assert _count(db, Task) == 1


def test_the_defaults_the_web_app_shows_against_are_the_runners_own():
    from helix_api.models import SessionType
    from helix_api.params import DEFAULTS
    from runner.backends import sdxl
    from runner.backends.text_generation import SamplingParams

    runner = SamplingParams()
    assert DEFAULTS[SessionType.TEXT] == {name: getattr(runner, name) for name in DEFAULTS[SessionType.TEXT]}
    assert DEFAULTS[SessionType.IMAGE] == {"num_inference_steps": sdxl.DEFAULT_STEPS, "num_images": 1,
                                          "guidance_scale": sdxl.DEFAULT_GUIDANCE, "negative_prompt": ""}
