"""The official `openai` client against a real `helix serve` and real runners on the tiny models.

Chats go to `helix-runner --backend mistral` on the tiny Mistral, images to `--backend sdxl` on the tiny
SDXL pipeline, all through `OpenAI(base_url=".../v1", api_key=<Helix API key>)`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image

from tests.e2e.client import openai_client
from tests.e2e.processes import SQLITE_ONLY, ApiServer, RunnerProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ASK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about dragons."}]


@pytest.fixture
def chat_server(text_api: ApiServer, tiny_mistral: Path, text_runner: Callable[..., RunnerProcess]) -> ApiServer:
    """The API offering the tiny Mistral (by its path), with a runner serving it."""
    text_runner(text_api, "create", tiny_mistral, "chat")
    return text_api


def test_a_chat_has_usage_and_its_stream_joins_to_the_same_text(chat_server, tiny_mistral):
    client = openai_client(chat_server)
    model = str(tiny_mistral)
    answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=16, seed=7, temperature=0.8)

    [choice] = answer.choices
    assert answer.object == "chat.completion" and answer.model == model and answer.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 16 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    stream = client.chat.completions.create(model=model, messages=ASK, max_tokens=16, seed=7, temperature=0.8,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_max_tokens_ends_with_length_and_stop_cuts_the_reply(chat_server, tiny_mistral):
    client = openai_client(chat_server)
    model = str(tiny_mistral)
    # Greedy, so the reply is long: the random tiny model never picks its end token first.
    full = client.chat.completions.create(model=model, messages=ASK, max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    text = full.choices[0].message.content
    assert len(text) >= 6, text

    stop = text[3:5]
    stopped = client.chat.completions.create(model=model, messages=ASK, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[:text.index(stop)]


def test_models_list_shows_the_served_model_and_the_configured_ones(chat_server, tiny_mistral):
    client = openai_client(chat_server)

    def served() -> list:
        # Configured by its path, the model is listed by its directory's name: a path is never shown.
        return [m for m in client.models.list().data if m.id == tiny_mistral.name and m.helix_served]

    [model] = wait_for(served, 60, "the runner's model to be listed as served", interval=0.5)
    assert model.object == "model" and model.owned_by == "helix" and model.helix_type == "text"
    ids = {m.id for m in client.models.list()}
    assert {"mistral-7b-instruct", "sdxl-base"} <= ids and str(tiny_mistral) not in ids


def test_errors_are_raised_as_the_clients_exceptions_with_the_message(api_server):
    server = api_server()
    client = openai_client(server)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert missing.value.code == "model_not_found" and "gpt-4o" in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="mistralai/Mistral-7B-Instruct-v0.1", messages=ASK, max_tokens=0)
    assert bad.value.param == "max_tokens" and "max_tokens" in bad.value.message
    with pytest.raises(openai.AuthenticationError) as unknown:
        openai_client(server, key="hx_not-a-key").models.list()
    assert unknown.value.code == "invalid_api_key" and "Unknown or revoked" in unknown.value.message


@SQLITE_ONLY
def test_images_come_back_as_64x64_pngs_in_base64_and_at_urls_that_need_no_key(image_api, image_runner, tiny_sdxl):
    image_runner(image_api, "create", tiny_sdxl, "draw")
    client = openai_client(image_api)
    # Helix params beyond OpenAI's, passed as the client passes extras.
    extras = {"num_inference_steps": 2, "seed": 5}

    inline = client.images.generate(model=str(tiny_sdxl), prompt="a red fox", size="64x64",
                                    response_format="b64_json", extra_body=extras)
    [image] = inline.data
    with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as png:
        assert png.format == "PNG" and png.size == (64, 64)

    linked = client.images.generate(model=str(tiny_sdxl), prompt="a red fox", size="64x64", response_format="url",
                                    extra_body=extras)
    fetched = requests.get(linked.data[0].url, timeout=30)  # no Authorization header
    assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/png"
    assert fetched.content == base64.b64decode(image.b64_json)  # the same seed and params: the same image

    pair = client.images.generate(model=str(tiny_sdxl), prompt="a red fox", size="64x64", n=2, extra_body=extras)
    for item in pair.data:
        with Image.open(io.BytesIO(requests.get(item.url, timeout=30).content)) as png:
            assert png.format == "PNG" and png.size == (64, 64)
    assert len({item.url for item in pair.data}) == 2
