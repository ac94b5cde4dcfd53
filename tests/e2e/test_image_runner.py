"""Image sessions end to end: `helix serve` and `helix-runner --backend sdxl` on the tiny SDXL pipeline.

The image runner's behaviour does not depend on the database, so these run on SQLite only.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import text

from helix_api.vocabulary import FINAL_INTERACTION_STATES
from tests.conftest import bearer
from tests.e2e.client import (
    cancel_session,
    create_finetune,
    create_session,
    fetch,
    get_session,
    reply_of,
    send_message,
    session_events,
    wait_for_reply,
    wait_for_session,
)
from tests.e2e.processes import SQLITE_ONLY, ApiServer

pytestmark = [pytest.mark.slow, SQLITE_ONLY]


def create_image_session(server: ApiServer, model: Path, message: str = "a red fox in the snow",
                         **params: Any) -> dict[str, Any]:
    """alice asks for an image."""
    return create_session(server, server.user, message, model=model, type_="image", **params)


def png_of(server: ApiServer, reply: dict[str, Any]) -> bytes:
    """The bytes of the reply's one image, fetched by its owner."""
    [image] = reply["files"]
    response = fetch(server, server.user, image["url"])
    assert response.status_code == 200, response.text
    return response.content


def test_an_image_session_makes_a_png_only_its_owner_can_fetch(image_api, image_runner, tiny_sdxl):
    image_runner(image_api, "create", tiny_sdxl)
    session = create_image_session(image_api, tiny_sdxl, width=96, height=64, num_inference_steps=3, seed=4)

    reply = wait_for_reply(image_api, image_api.user, session["id"], timeout=120)

    assert reply["state"] == "complete", reply
    [image] = reply["files"]
    assert image["kind"] == "output" and image["content_type"] == "image/png"
    response = fetch(image_api, image_api.user, image["url"])
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("image/png")
    with Image.open(io.BytesIO(response.content)) as png:
        assert png.format == "PNG" and png.size == (96, 64)
    stranger = bearer(image_api.create_user("mallory"))
    assert fetch(image_api, stranger, image["url"]).status_code == 404


def test_progress_arrives_once_per_step_in_order_then_the_same_seed_repeats(image_api, image_runner, tiny_sdxl):
    image_runner(image_api, "create", tiny_sdxl)
    session = create_image_session(image_api, tiny_sdxl, num_inference_steps=6, seed=9)

    def ended(events: list[dict[str, Any]]) -> bool:
        data = events[-1]["data"]
        return data["kind"] == "state" and data["state"] in FINAL_INTERACTION_STATES

    events = session_events(image_api, image_api.user, session["id"], follow=True, until=ended, timeout=120)

    assert events[-1]["data"]["state"] == "complete", events[-1]
    progress = [(e["data"]["step"], e["data"]["total"]) for e in events if e["data"]["kind"] == "progress"]
    assert progress == [(step, 6) for step in range(1, 7)]
    first = png_of(image_api, reply_of(get_session(image_api, image_api.user, session["id"])))
    again = create_image_session(image_api, tiny_sdxl, num_inference_steps=6, seed=9)
    assert png_of(image_api, wait_for_reply(image_api, image_api.user, again["id"], timeout=120)) == first


def test_cancel_stops_a_long_image_run(image_api, image_runner, tiny_sdxl):
    runner = image_runner(image_api, "create", tiny_sdxl)
    session = create_image_session(image_api, tiny_sdxl, width=256, height=256, num_inference_steps=150, seed=1)

    def denoising(session: dict[str, Any]) -> bool:
        progress = reply_of(session)["progress"]
        return bool(progress and progress.get("step", 0) >= 1)

    wait_for_session(image_api, image_api.user, session["id"], denoising, 120, "the first denoising step")
    cancel_session(image_api, image_api.user, session["id"])

    reply = wait_for_reply(image_api, image_api.user, session["id"], timeout=60)
    assert reply["state"] == "cancelled" and reply["files"] == []
    runner.wait_for_log("cancelled by the user", 30, "the runner to stop the task")
    # The runner is free again: the next image comes out.
    after = create_image_session(image_api, tiny_sdxl, num_inference_steps=2, seed=1)
    assert wait_for_reply(image_api, image_api.user, after["id"], timeout=120)["state"] == "complete"


def test_a_bad_image_param_fails_the_task_once_without_a_retry(image_api, image_runner, tiny_sdxl):
    session = create_image_session(image_api, tiny_sdxl, num_inference_steps=2, seed=1)
    # The API refuses such a param itself (400), so the queued task is given it behind the API's back: as a
    # task stored before a check existed would carry it. The runner is started only then, so it claims this.
    with image_api.engine.begin() as conn:
        conn.execute(text("UPDATE tasks SET params = :params WHERE session_id = :session"),
                     {"params": json.dumps({"num_inference_steps": "many", "seed": 1}), "session": session["id"]})
    runner = image_runner(image_api, "create", tiny_sdxl)

    reply = wait_for_reply(image_api, image_api.user, session["id"], timeout=120)

    assert reply["state"] == "error" and reply["files"] == []
    assert reply["error"].startswith("param 'num_inference_steps' must be an integer") and "many" in reply["error"]
    assert image_api.sql("SELECT status, attempt FROM tasks WHERE session_id = :s", s=session["id"]) == [
        ("failed", 1)]
    # The runner goes on to the next task.
    after = create_image_session(image_api, tiny_sdxl, num_inference_steps=1, seed=1)
    assert wait_for_reply(image_api, image_api.user, after["id"], timeout=120)["state"] == "complete"
    assert runner.proc.poll() is None


def training_images(tmp_path: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart parts: three small PNGs and one captions.json."""
    parts, captions = [], {}
    for name, colour, caption in [("red.png", (220, 30, 30), "a red square"),
                                  ("green.png", (30, 200, 60), "a green field"),
                                  ("blue.png", (40, 60, 230), "a blue sky")]:
        image = Image.new("RGB", (72, 64), colour)
        image.paste((255, 255, 255), (8, 8, 24, 24))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        parts.append(("files", (name, buffer.getvalue(), "image/png")))
        captions[name] = caption
    parts.append(("files", ("captions.json", json.dumps(captions).encode(), "application/json")))
    return parts


def test_an_image_finetune_makes_an_adapter_that_changes_the_next_image(image_api, image_runner, tiny_sdxl,
                                                                        tmp_path):
    image_runner(image_api, "finetune", tiny_sdxl)
    image_runner(image_api, "create", tiny_sdxl)
    train = {"max_steps": 4, "learning_rate": 0.02, "lora_r": 4, "resolution": 64, "seed": 0}
    session_id = create_finetune(image_api, tiny_sdxl, training_images(tmp_path), type_="image", **train)["id"]
    draw = {"num_inference_steps": 3, "seed": 11}
    base = create_image_session(image_api, tiny_sdxl, "a red square", **draw)

    tuned = wait_for_reply(image_api, image_api.user, session_id, timeout=240)

    assert tuned["state"] == "complete", tuned
    assert [f["kind"] for f in tuned["files"]] == ["adapter"]
    assert get_session(image_api, image_api.user, session_id)["mode"] == "create"
    base_png = png_of(image_api, wait_for_reply(image_api, image_api.user, base["id"], timeout=120))
    send_message(image_api, image_api.user, session_id, "a red square", **draw)
    reply = wait_for_reply(image_api, image_api.user, session_id, timeout=120)
    assert reply["state"] == "complete", reply
    assert png_of(image_api, reply) != base_png
