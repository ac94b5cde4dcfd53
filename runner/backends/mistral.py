"""Chat inference on a causal LM (Mistral-7B-Instruct by default) and, in finetune mode, LoRA training.

setup() checks the weights fit, then loads the model and tokenizer once (by hub id or local path; hub
weights come from HF_HOME). predict() builds the prompt from the whole conversation with the
tokenizer's chat template, applies the session's adapter if it has one, and streams the reply token by
token. With max_parallel N, up to N tasks are decoded together in one batch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from runner.adapters import AdapterCache, adapter_key
from runner.backends.base import Backend
from runner.backends.text_generation import GenerationRequest, SamplingParams, TextGenerator
from runner.config import RunnerConfig
from runner.messages import Task
from runner.placement import count_parameters, plan_placement
from runner.reporter import Report

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "mistralai/Mistral-7B-Instruct-v0.1"


class MistralBackend(Backend):
    """A causal LM loaded once; serves chats (several at once with max_parallel) or trains adapters."""

    def __init__(self, config: RunnerConfig | None = None) -> None:
        super().__init__(config)
        self.model: Any = None
        self.tokenizer: Any = None
        self.generator: TextGenerator | None = None
        self.adapters: AdapterCache | None = None
        self.max_parallel = config.max_parallel if config is not None else 1

    @property
    def model_name(self) -> str:
        """The model to load: the configured name (a hub id or a local path)."""
        return (self.config.model_name if self.config is not None else "") or DEFAULT_MODEL

    def setup(self) -> None:
        """Check the weights fit, then load them; a fine-tuning runner loads nothing up front."""
        if self.config is not None and self.config.mode == "finetune":
            self.max_parallel = 1  # one training run at a time; it loads its own copy of the model
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = self.model_name
        placement = plan_placement(self.config or RunnerConfig("", "", "create", "text", name))
        placement.check_fits(count_parameters(name), name)
        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModelForCausalLM.from_pretrained(name, **placement.load_kwargs())
        if placement.device == "cpu":
            self.model.to("cpu")
        self.model.eval()
        logger.info("%s loaded in %.1fs on %s (%s%s)", name, time.monotonic() - started, placement.device,
                    placement.dtype, f", {placement.quantize}" if placement.quantize else "")
        self.adapters = AdapterCache(self.model)
        self.generator = TextGenerator(self.model, self.tokenizer, device=placement.input_device,
                                       max_batch=self.max_parallel, adapters=self.adapters)

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Answer the conversation (streaming the reply), or train a LoRA adapter in finetune mode."""
        if task.mode == "finetune":
            from runner.backends.mistral_finetune import train_lora

            return train_lora(task, report, config=self.config)
        if self.generator is None:
            raise RuntimeError("predict() called before setup()")
        with self.generator.arriving():
            request = GenerationRequest(
                prompt_ids=self.prompt_ids(task.input.get("messages") or []),
                params=SamplingParams.from_params(task.params),
                on_text=report.token,
                cancelled=lambda: report.cancelled,
            )
            if task.adapter:
                # Fetched once per runner (cached on disk by checksum), loaded once while it stays in the LRU.
                request.adapter = adapter_key(task.adapter)
                request.adapter_path = str(report.files.fetch_dir(task.adapter))
            self.generator.submit(request)
        self.generator.wait(request)
        if request.finish_reason == "cancelled":
            report.check()  # raises TaskCancelled: the loop tells the API
        prompt_tokens = len(request.prompt_ids)
        return {
            "text": request.text,
            "finish_reason": request.finish_reason,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": request.completion_tokens,
                      "total_tokens": prompt_tokens + request.completion_tokens},
            "seed": request.params.seed,
        }

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The whole conversation through the tokenizer's chat template, ready for the reply."""
        if not messages:
            raise ValueError("a text task needs input.messages with at least one message")
        conversation = [{"role": m.get("role", "user"), "content": str(m.get("content", ""))} for m in messages]
        if self.tokenizer.chat_template is None:  # a base model: a plain transcript it can continue
            text = "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"
            return [int(i) for i in self.tokenizer(text)["input_ids"]]
        if conversation[0]["role"] == "system" and len(conversation) > 1 and conversation[1]["role"] == "user":
            try:
                return self._apply_template(conversation)
            except Exception:
                # Mistral-7B-Instruct-v0.1's own template takes no system role: fold it into the first turn.
                system, first, *rest = conversation
                conversation = [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]
        return self._apply_template(conversation)

    def _apply_template(self, conversation: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # a BatchEncoding, as newer transformers return by default
            ids = ids["input_ids"]
        return [int(i) for i in ids]
