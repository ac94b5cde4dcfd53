"""LoRA fine-tuning on the tiny SDXL pipeline: an adapter comes out, images made with it differ, it goes away."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from runner.backends.sdxl import SDXLBackend
from runner.errors import TaskCancelled
from tests.doubles import FakeFiles, FakeReport
from tests.runner.backends.image_doubles import finetune_task, image_task

pytestmark = pytest.mark.slow  # they train, if only for a few steps

COLOURS = {"red.png": ((220, 30, 30), "a red square"), "green.png": ((30, 200, 60), "a green field"),
           "blue.png": ((40, 60, 230), "a blue sky")}
TRAIN = {"max_steps": 4, "learning_rate": 0.02, "lora_r": 4, "resolution": 64, "seed": 0}


@pytest.fixture
def training_task(tmp_path: Path, files: FakeFiles):
    """A finetune task on three small captioned images of odd sizes, uploaded to the fake store."""
    def make(**params):
        refs, captions = [], {}
        for index, (name, (colour, caption)) in enumerate(COLOURS.items()):
            path = tmp_path / name
            image = Image.new("RGB", (80 + 16 * index, 72), colour)
            image.paste((255, 255, 255), (10, 10, 30, 30))
            image.save(path)
            refs.append(files.add(path, kind="upload", content_type="image/png"))
            captions[name] = caption
        return finetune_task(refs, captions, **{**TRAIN, **params})
    return make


def image_of(sdxl_backend: SDXLBackend, files: FakeFiles, adapter=None) -> bytes:
    result = sdxl_backend.predict(image_task(adapter=adapter, num_inference_steps=3, seed=11), FakeReport(files))
    return files.stored[result["files"][0]]["path"].read_bytes()


def test_finetune_uploads_an_adapter_with_progress_and_loss(sdxl_backend, files, training_task):
    report = FakeReport(files)

    result = sdxl_backend.train(training_task(), report)

    assert result["steps"] == 4 and math.isfinite(result["loss"]) and result["text"]
    [adapter] = files.of_kind("adapter")
    assert result["adapter_file_id"] == adapter["id"]
    with zipfile.ZipFile(adapter["path"]) as archive:
        assert "pytorch_lora_weights.safetensors" in archive.namelist()
    progress = report.progress_events
    assert [(e["step"], e["total"]) for e in progress] == [(step, 4) for step in range(1, 5)]
    assert all(math.isfinite(e["loss"]) for e in progress)


def test_an_image_with_the_adapter_differs_and_the_adapter_is_unloaded_after(sdxl_backend, files, training_task):
    base = image_of(sdxl_backend, files)
    result = sdxl_backend.train(training_task(), FakeReport(files))
    assert image_of(sdxl_backend, files) == base  # training left the base UNet as it was
    adapter = {k: v for k, v in files.stored[result["adapter_file_id"]].items() if k != "path"}

    report = FakeReport(files)
    tuned = sdxl_backend.predict(image_task(adapter=adapter, num_inference_steps=3, seed=11), report)

    assert files.stored[tuned["files"][0]]["path"].read_bytes() != base
    assert any(e["kind"] == "log" and "loading adapter" in e["message"] for e in report.events)
    assert image_of(sdxl_backend, files) == base  # the next task without an adapter gets the bare base model
    assert image_of(sdxl_backend, files, adapter) == files.stored[tuned["files"][0]]["path"].read_bytes()


def test_cancel_stops_training_and_leaves_the_unet_bare(sdxl_backend, files, training_task):
    base = image_of(sdxl_backend, files)
    report = FakeReport(files, cancel_at_step=2)

    with pytest.raises(TaskCancelled):
        sdxl_backend.train(training_task(max_steps=100), report)

    assert [e["step"] for e in report.progress_events] == [1, 2]
    assert files.of_kind("adapter") == []
    assert image_of(sdxl_backend, files) == base


def test_an_adapter_is_unloaded_even_when_its_task_is_cancelled(sdxl_backend, files, training_task):
    base = image_of(sdxl_backend, files)
    result = sdxl_backend.train(training_task(), FakeReport(files))
    adapter = {k: v for k, v in files.stored[result["adapter_file_id"]].items() if k != "path"}

    report = FakeReport(files, cancel_at_step=1)
    with pytest.raises(TaskCancelled):
        sdxl_backend.predict(image_task(adapter=adapter, num_inference_steps=5, seed=11), report)

    assert image_of(sdxl_backend, files) == base
