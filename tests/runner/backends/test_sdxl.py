"""The SDXL backend on the tiny pipeline, with a fake report and file store: images, seeds, steps, cancel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runner.backends.sdxl import PipelineLoadError, SDXLBackend
from runner.errors import BadTaskInput, TaskCancelled
from runner.placement import ModelTooLarge, PlacementError
from tests.doubles import FakeFiles, FakeReport
from tests.runner.backends.image_doubles import finetune_task, image_task, tiny_config


def run(sdxl_backend: SDXLBackend, files: FakeFiles, **params) -> tuple[dict, FakeReport]:
    report = FakeReport(files)
    return sdxl_backend.predict(image_task(**params), report), report


def image_bytes(files: FakeFiles, file_id: str) -> bytes:
    return files.stored[file_id]["path"].read_bytes()


def pixels(files: FakeFiles, file_id: str) -> np.ndarray:
    with Image.open(files.stored[file_id]["path"]) as image:
        return np.asarray(image.convert("RGB"))


def test_makes_a_png_of_the_asked_size(sdxl_backend, files):
    result, _ = run(sdxl_backend, files, width=96, height=64, num_inference_steps=2, seed=3)

    assert result["text"] == "" and (result["width"], result["height"], result["seed"]) == (96, 64, 3)
    [file_id] = result["files"]
    stored = files.stored[file_id]
    assert stored["kind"] == "output" and stored["content_type"] == "image/png"
    with Image.open(stored["path"]) as image:
        assert image.format == "PNG" and image.size == (96, 64)


def test_defaults_to_the_pipelines_native_size_and_a_random_seed(sdxl_backend, files):
    result, _ = run(sdxl_backend, files, num_inference_steps=1)

    with Image.open(files.stored[result["files"][0]]["path"]) as image:
        assert image.size == (64, 64)
    assert isinstance(result["seed"], int)


def test_the_same_seed_gives_the_same_image(sdxl_backend, files):
    first, _ = run(sdxl_backend, files, num_inference_steps=3, seed=7)
    again, _ = run(sdxl_backend, files, num_inference_steps=3, seed=7)
    other, _ = run(sdxl_backend, files, num_inference_steps=3, seed=8)

    assert image_bytes(files, first["files"][0]) == image_bytes(files, again["files"][0])
    assert image_bytes(files, first["files"][0]) != image_bytes(files, other["files"][0])


def test_prompt_negative_prompt_and_guidance_change_the_image(sdxl_backend, files):
    base, _ = run(sdxl_backend, files, num_inference_steps=2, seed=1, guidance_scale=7.0)
    negative, _ = run(sdxl_backend, files, num_inference_steps=2, seed=1, guidance_scale=7.0, negative_prompt="blurry")
    report = FakeReport(files)
    prompt = sdxl_backend.predict(image_task(prompt="a blue robot", num_inference_steps=2, seed=1, guidance_scale=7.0),
                             report)

    images = {image_bytes(files, r["files"][0]) for r in (base, negative, prompt)}
    assert len(images) == 3


def test_num_images_makes_that_many_different_images(sdxl_backend, files):
    result, _ = run(sdxl_backend, files, num_inference_steps=2, seed=5, num_images=3)
    single, _ = run(sdxl_backend, files, num_inference_steps=2, seed=6)

    assert len(result["files"]) == 3
    images = [image_bytes(files, file_id) for file_id in result["files"]]
    assert len(set(images)) == 3
    # Image i of a batch is what a one-image task with seed + i makes (up to rounding: batched maths differs).
    assert pixels(files, result["files"][1]).astype(int) == pytest.approx(
        pixels(files, single["files"][0]).astype(int), abs=2)


def test_progress_comes_once_per_step_in_order(sdxl_backend, files):
    _, report = run(sdxl_backend, files, num_inference_steps=5, seed=2)

    progress = report.progress_events
    assert [(e["step"], e["total"]) for e in progress] == [(step, 5) for step in range(1, 6)]


def test_cancel_stops_a_long_run_at_the_next_step(sdxl_backend, files):
    report = FakeReport(files, cancel_at_step=3)

    with pytest.raises(TaskCancelled):
        sdxl_backend.predict(image_task(num_inference_steps=150, seed=2), report)

    assert [e["step"] for e in report.progress_events] == [1, 2, 3]
    assert files.of_kind("output") == []
    # The pipeline is still good for the next task.
    result, _ = run(sdxl_backend, files, num_inference_steps=1, seed=2)
    assert len(result["files"]) == 1


def test_a_task_cancelled_before_it_starts_makes_nothing(sdxl_backend, files):
    report = FakeReport(files)
    report.cancel()

    with pytest.raises(TaskCancelled):
        sdxl_backend.predict(image_task(num_inference_steps=2), report)
    assert report.events == [] and files.of_kind("output") == []


def test_setup_fails_clearly_when_the_pipeline_cannot_load(tmp_path):
    sdxl_backend = SDXLBackend(tiny_config(tmp_path / "no-such-model"))

    with pytest.raises(PipelineLoadError, match="cannot load SDXL pipeline"):
        sdxl_backend.setup()


def test_setup_fails_clearly_when_the_pipeline_does_not_fit(tiny_sdxl):
    sdxl_backend = SDXLBackend(tiny_config(tiny_sdxl, cpu_memory="1MiB"))

    with pytest.raises(ModelTooLarge, match="does not fit"):
        sdxl_backend.setup()
    assert sdxl_backend.pipe is None


def test_setup_refuses_a_gpu_that_is_not_there(tiny_sdxl, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PlacementError, match="no CUDA GPU"):
        SDXLBackend(tiny_config(tiny_sdxl, device="cuda")).setup()


def test_predict_before_setup_is_an_error(tiny_sdxl, files):
    with pytest.raises(RuntimeError, match="before setup"):
        SDXLBackend(tiny_config(tiny_sdxl)).predict(image_task(), FakeReport(files))


# Input that can never succeed: BadTaskInput (the task fails once, no retry), before any step runs.


@pytest.mark.parametrize(("params", "named"), [
    ({"num_inference_steps": "many"}, "num_inference_steps"), ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"width": "wide"}, "width"), ({"height": 100}, "height"), ({"guidance_scale": "strong"}, "guidance_scale"),
    ({"num_images": 1.5}, "num_images"), ({"seed": -1}, "seed"), ({"negative_prompt": 5}, "negative_prompt"),
])
def test_a_bad_image_param_is_bad_input_naming_it(sdxl_backend, files, params, named):
    report = FakeReport(files)

    with pytest.raises(BadTaskInput, match=f"param '{named}'"):
        sdxl_backend.predict(image_task(**{"num_inference_steps": 2, **params}), report)

    assert report.events == [] and files.of_kind("output") == []


def test_an_image_task_without_a_prompt_is_bad_input(sdxl_backend, files):
    with pytest.raises(BadTaskInput, match="prompt"):
        sdxl_backend.predict(image_task(prompt="  "), FakeReport(files))


def test_an_adapter_without_lora_weights_is_bad_input_and_the_pipeline_stays_usable(sdxl_backend, files, tmp_path):
    files.dirs["broken"] = tmp_path  # an unpacked adapter with no .safetensors in it

    with pytest.raises(BadTaskInput, match="adapter broken.zip: no LoRA weights"):
        sdxl_backend.predict(image_task(adapter={"id": "broken", "name": "broken.zip"}, num_inference_steps=1),
                             FakeReport(files))

    result, _ = run(sdxl_backend, files, num_inference_steps=1, seed=2)
    assert len(result["files"]) == 1


def test_predict_refuses_a_finetune_task_and_train_a_create_task(sdxl_backend, files):
    with pytest.raises(BadTaskInput, match="predict"):
        sdxl_backend.predict(finetune_task([], {}), FakeReport(files))
    with pytest.raises(BadTaskInput, match="train"):
        sdxl_backend.train(image_task(), FakeReport(files))


def test_training_input_that_cannot_be_used_is_bad_input_before_training(sdxl_backend, files, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    ref = files.add(text, content_type="image/png")

    with pytest.raises(BadTaskInput, match="param 'max_steps'"):
        sdxl_backend.train(finetune_task([ref], {}, max_steps="forever"), FakeReport(files))
    with pytest.raises(BadTaskInput, match="input.files"):
        sdxl_backend.train(finetune_task([], {}), FakeReport(files))
    with pytest.raises(BadTaskInput, match="notes.png is not an image"):
        sdxl_backend.train(finetune_task([ref], {}, max_steps=1), FakeReport(files))
    assert files.of_kind("adapter") == []


def test_the_tiny_pipeline_draws_in_a_few_steps_when_a_task_names_none(sdxl_backend, files):
    # Its weights are random: every step is noise, so the default is a few steps, not a real SDXL's 30.
    _, report = run(sdxl_backend, files, seed=1)

    steps = [event for event in report.events if event["kind"] == "progress"]
    assert [event["step"] for event in steps] == [1, 2, 3, 4] and steps[-1]["total"] == 4
