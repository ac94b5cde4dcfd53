"""A fake report and file store for the text backend's unit tests: what the runner hands predict(), in memory."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from runner.config import RunnerConfig
from runner.errors import StopReason, TaskCancelled
from runner.messages import Task


class FakeFiles:
    """`report.files` with adapter zips served from a local dict: ref id -> unpacked directory."""

    def __init__(self) -> None:
        self.dirs: dict[Any, Path] = {}
        self.fetched: list[Any] = []

    def fetch_dir(self, ref: dict[str, Any]) -> Path:
        self.fetched.append(ref["id"])
        return self.dirs[ref["id"]]


class FakeReport:
    """What predict() reports through, recorded; `cancel_after` tokens it cancels the task."""

    def __init__(self, files: FakeFiles | None = None, cancel_after: int | None = None) -> None:
        self.tokens: list[str] = []
        self.logs: list[str] = []
        self.files = files or FakeFiles()
        self.cancel_after = cancel_after
        self._reason: StopReason | None = None
        self._lock = threading.Lock()

    def token(self, text: str) -> None:
        self.check()
        with self._lock:
            self.tokens.append(text)
            if self.cancel_after is not None and len(self.tokens) >= self.cancel_after:
                self._reason = StopReason.CANCELLED

    def progress(self, step: int, total: int, message: str | None = None, **extra: Any) -> None:
        self.check()

    def log(self, message: str, level: str = "info") -> None:
        self.check()
        self.logs.append(message)

    def check(self) -> None:
        if self._reason is not None:
            raise TaskCancelled(self._reason)

    @property
    def cancelled(self) -> bool:
        return self._reason is not None


def text_config(model: str | Path, **overrides: Any) -> RunnerConfig:
    """A runner config for the text backend on `model`, on CPU."""
    values: dict[str, Any] = {"api_url": "http://helix.test", "token": "hxr_test", "mode": "create",
                              "type": "text", "model_name": str(model), "backend": "mistral", "device": "cpu"}
    values.update(overrides)
    return RunnerConfig(**values)


_ids = iter(range(1, 10**6))


def text_task(message: str | list[dict[str, str]] = "hello there", *, adapter: dict[str, Any] | None = None,
              mode: str = "create", **params: Any) -> Task:
    """A text task: a one-message chat (or the given messages) with these params."""
    messages = [{"role": "user", "content": message}] if isinstance(message, str) else message
    task_id = next(_ids)
    return Task(id=task_id, session_id=task_id, interaction_id=task_id, mode=mode, type="text",
                model_name="tiny", attempt=1, input={"messages": messages}, params=params, adapter=adapter)


def make_adapter(base_path: Path, dest: Path, seed: int) -> Path:
    """A LoRA adapter for the tiny model with random (non-zero) weights, saved as peft saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(dest)
    return dest
