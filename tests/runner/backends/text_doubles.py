"""Configs, tasks and adapters for the text backend's tests (the report and file store are in tests.doubles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.config import RunnerConfig
from runner.messages import Task


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
