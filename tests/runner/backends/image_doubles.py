"""Configs and tasks for the image backend's tests (the report and file store are in tests.doubles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.config import RunnerConfig
from runner.messages import Task

IMAGE_MODEL = "tiny-sdxl"


def image_task(task_id: int = 1, prompt: str = "a red fox in the snow", adapter: dict[str, Any] | None = None,
               **params: Any) -> Task:
    """A create/image task as a runner claims it."""
    return Task(id=task_id, session_id=1, interaction_id=2, mode="create", type="image", model_name=IMAGE_MODEL,
                attempt=1, input={"prompt": prompt, "messages": [{"role": "user", "content": prompt}]},
                params=params, adapter=adapter)


def finetune_task(files: list[dict[str, Any]], captions: dict[str, str], task_id: int = 9, **params: Any) -> Task:
    """A finetune/image task as a runner claims it."""
    return Task(id=task_id, session_id=1, interaction_id=2, mode="finetune", type="image", model_name=IMAGE_MODEL,
                attempt=1, input={"files": files, "captions": captions}, params=params)


def tiny_config(model: Path | str, **overrides: Any) -> RunnerConfig:
    """A runner config for the SDXL backend on `model`, on CPU (the cache under the model's directory)."""
    values: dict[str, Any] = {"api_url": "http://helix.test", "token": "hxr_test", "mode": "create", "type": "image",
                              "model_name": str(model), "backend": "sdxl", "device": "cpu",
                              "cache_dir": str(Path(model).parent / "runner-cache")}
    values.update(overrides)
    return RunnerConfig(**values)
