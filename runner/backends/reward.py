"""Scoring replies with a reward model: the base model with a one-label score head and a session's adapter.

A runner started with `--backend reward --mode score` claims `score` tasks (see helix_api/sessions/scoring.py):
`{"prompt", "candidates": [...], "adapter": FILE_REF}`. setup() loads the base model once as a
sequence classifier; each task applies the reward-model fine-tune's adapter (its LoRA and the trained
score head, kept loaded until another adapter is asked for) and scores each candidate as the reply to
the prompt, through the chat template exactly as the reward model was trained on comparisons.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from runner.adapters import adapter_key
from runner.backends.base import Backend
from runner.config import RunnerConfig
from runner.errors import BadTaskInput
from runner.messages import Task
from runner.reporter import Report

logger = logging.getLogger(__name__)


class RewardBackend(Backend):
    """A reward model: the base model's body with a score head, per-task adapters, one score per candidate."""

    def __init__(self, config: RunnerConfig) -> None:
        super().__init__(config)
        self.base: Any = None
        self.model: Any = None  # the base with the current adapter applied (a PeftModel), or None
        self.tokenizer: Any = None
        self.adapter: str | None = None  # key of the adapter applied now

    def setup(self) -> None:
        """Load the tokenizer and the base model as a one-label sequence classifier, on the CPU or a GPU."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        name = self.config.model_name
        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        device = "cuda" if self.config.device != "cpu" and torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.base = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, dtype=dtype).to(device)
        if self.base.config.pad_token_id is None:
            self.base.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        self.base.eval()
        logger.info("%s loaded as a reward model in %.1fs on %s", name, time.monotonic() - started, device)

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Score each candidate reply to the prompt with the task's reward-model adapter."""
        import torch

        if self.base is None:
            raise RuntimeError("predict() called before setup()")
        prompt, candidates = task.input.get("prompt"), task.input.get("candidates")
        if not isinstance(prompt, str) or not isinstance(candidates, list) or not candidates \
                or not all(isinstance(c, str) for c in candidates):
            raise BadTaskInput(f"task {task.id}: a score task needs a prompt and a list of candidate replies")
        if not task.adapter:
            raise BadTaskInput(f"task {task.id}: a score task needs the reward model's adapter")
        model = self._with_adapter(task.adapter, report)
        scores = []
        with torch.inference_mode():
            for index, candidate in enumerate(candidates):
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": candidate}],
                    tokenize=True, return_dict=True, return_tensors="pt")
                logits = model(input_ids=ids["input_ids"].to(self.base.device),
                               attention_mask=ids["attention_mask"].to(self.base.device)).logits
                scores.append(round(float(logits[0, 0]), 6))
                report.progress(index + 1, len(candidates), message="scoring")
        logger.info("task %s: scored %d candidates", task.id, len(candidates))
        return {"text": "scores: " + ", ".join(f"{s:.4f}" for s in scores), "scores": scores}

    def _with_adapter(self, ref: dict[str, Any], report: Report) -> Any:
        """The base model with this adapter applied: the one applied already, or this one in its place."""
        key = adapter_key(ref)
        if key == self.adapter and self.model is not None:
            return self.model
        from peft import PeftModel

        path = report.files.fetch_dir(ref)
        if self.model is not None:
            self.base = self.model.unload()  # the base's own layers and head back, for the next adapter
            self.model, self.adapter = None, None
        try:
            self.model = PeftModel.from_pretrained(self.base, str(path)).eval()
        except (ValueError, KeyError, RuntimeError) as exc:  # not a reward model's adapter for this base
            raise BadTaskInput(f"the adapter is not a reward model of {self.config.model_name}: {exc}") from exc
        self.adapter = key
        return self.model
