"""The fine-tune form: training data checked by the API's own rules, errors by the field, nothing half-stored."""

from __future__ import annotations

import io
import json

from tests.api.test_finetune import _finish_training, chats, counts, png
from tests.conftest import IMAGE_MODEL, TEXT_MODEL, claim
from tests.web.conftest import sign_in, submit


def upload(browser, files, *, type_="text", model=TEXT_MODEL, **fields):
    data = {"type": type_, "model_name": model, **fields,
            "files": [(io.BytesIO(content), name) for name, content in files]}
    return submit(browser, "/new/finetune", data, page="/new/finetune", content_type="multipart/form-data")


def test_a_bad_training_file_is_listed_line_by_line_and_nothing_is_stored(browser, db, settings):
    before = counts(db, settings)
    bad = chats(10) + b'{"messages": [{"role": "robot", "content": "x"}]}\n' + b"{not json\n"

    response = upload(browser, [("chats.jsonl", bad)], max_steps="5", name="My tune")

    assert response.status_code == 400
    html = response.data.decode()
    assert '<p class="field-error" data-field="files">The training data has problems' in html
    assert "<li><code>chats.jsonl:11</code> messages[0] has unknown role &#39;robot&#39;" in html
    assert "<li><code>chats.jsonl:12</code> not valid JSON" in html
    assert 'value="My tune"' in html and 'value="5"' in html  # what was typed stays
    assert counts(db, settings) == before


def test_bad_params_and_a_wrong_model_show_by_their_fields(browser, db, settings):
    before = counts(db, settings)
    wrong = upload(browser, [("d.jsonl", chats(10))], model=IMAGE_MODEL)
    assert wrong.status_code == 400 and b'data-field="model_name">Unknown text model' in wrong.data
    rate = upload(browser, [("d.jsonl", chats(10))], learning_rate="-1")
    assert rate.status_code == 400 and b'data-field="params.learning_rate">Param &#39;learning_rate&#39;' in rate.data
    assert counts(db, settings) == before


def test_an_upload_over_the_limit_is_a_413_page_and_stores_nothing(make_client, make_key, db, settings):
    browser = make_client(MAX_UPLOAD_BYTES=2000)
    sign_in(browser, make_key())
    before = counts(db, settings)
    response = upload(browser, [("d.jsonl", chats(200))])
    assert response.status_code == 413 and response.mimetype == "text/html" and b"2000 bytes" in response.data
    assert counts(db, settings) == before


def test_a_fine_tune_from_the_form_trains_then_takes_messages(browser, client, runner):
    response = upload(browser, [("d.jsonl", chats(12))], max_steps="3", lora_r="4")
    assert response.status_code == 302, response.data.decode()[:2000]
    page = response.headers["Location"]
    html = browser.get(page).data.decode()
    assert "Fine-tune" in html and "d.jsonl" in html and 'data-phase="queued"' in html

    claimed = claim(client, runner, mode="finetune").json
    assert claimed["task"]["params"] == {"max_steps": 3, "lora_r": 4}
    task_id, token = claimed["task"]["id"], claimed["lease"]["token"]
    client.post(f"/api/v1/worker/task/{task_id}/events", headers=runner, json={
        "lease_token": token, "events": [{"seq": 1, "kind": "progress", "step": 2, "total": 3, "loss": 0.5}]})
    html = browser.get(page).data.decode()
    assert 'data-phase="training"' in html and "step 2 of 3 · loss 0.5000" in html

    _finish_training(client, runner, claimed)
    html = browser.get(page).data.decode()
    assert 'data-phase="complete"' in html and "adapter" in html
    said = submit(browser, f"{page}/messages", {"message": "Say 3"}, page=page)
    assert said.status_code == 302
    assert claim(client, runner).json["task"]["adapter"] is not None


def test_an_image_fine_tune_takes_images_with_a_captions_file(browser, db):
    files = [(f"{name}.png", png(colour=name)) for name in ("red", "green", "blue")]
    captions = json.dumps({f"{name}.png": f"a {name} square" for name in ("red", "green", "blue")}).encode()
    response = upload(browser, [*files, ("captions.json", captions)], type_="image", model=IMAGE_MODEL)
    assert response.status_code == 302, response.data.decode()[:2000]
    missing = upload(browser, files[:2] + [("captions.json", captions)], type_="image", model=IMAGE_MODEL)
    assert missing.status_code == 400 and b'data-field="files"' in missing.data
