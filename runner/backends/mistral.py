"""Chat inference on a causal LM (Mistral-7B-Instruct by default) and LoRA fine-tuning of it.

predict() answers one chat: setup() has checked the weights fit and loaded the model and tokenizer once
(by hub id or local path; hub weights come from HF_HOME); the prompt is the whole conversation through
the tokenizer's chat template, the session's adapter is applied if it has one, and the reply streams
token by token. With max_parallel N (the runner's --max-parallel), up to N chats decode in one batch.
A task may shape its reply (response_format, tools and tool_choice: runner.backends.constraints builds
the grammar, runner.backends.tool_calls the prompt's tools and the calls' layout) and ask for logprobs.

train() fine-tunes a LoRA adapter with axolotl (runner.backends.mistral_finetune) in a subprocess that
loads its own copy of the model; so a runner in finetune mode loads nothing in setup() and trains one
task at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from runner.adapters import AdapterCache, adapter_key
from runner.backends import params as param
from runner.backends.base import Backend
from runner.backends.constraints import Grammars, ReplyRules, reply_grammar
from runner.backends.text_generation import GenerationRequest, SamplingParams, TextGenerator
from runner.backends.tool_calls import (
    HoldBack,
    ToolFormat,
    default_layout,
    read_calls,
    template_messages,
    template_takes_tools,
    tool_format,
)
from runner.capacity import slots_for_model
from runner.config import RunnerConfig
from runner.errors import BadTaskInput
from runner.messages import FINETUNE, Task
from runner.placement import count_parameters, plan_placement
from runner.reporter import Report

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "mistralai/Mistral-7B-Instruct-v0.1"
MOST_TOP_LOGPROBS = 20


class MistralBackend(Backend):
    """A causal LM loaded once: predict() serves chats (several at once), train() fine-tunes adapters."""

    def __init__(self, config: RunnerConfig) -> None:
        super().__init__(config)
        self.model: Any = None
        self.tokenizer: Any = None
        self.generator: TextGenerator | None = None
        self.adapters: AdapterCache | None = None
        self.tool_format: ToolFormat | None = None
        self._grammars: Grammars | None = None  # built on the first task that shapes its reply
        self._grammars_lock = threading.Lock()
        # Chats batch on the one loaded model; each training run loads a model of its own, so one at a time
        # (beside chats, the runner's slot gate runs it alone). With --max-parallel auto, setup() sizes the
        # batch once the weights are in memory.
        self.max_parallel = 1 if not config.predicts or config.parallel_auto else config.max_parallel
        self.sizes_slots = config.predicts

    @property
    def model_name(self) -> str:
        """The model to load: the configured name (a hub id or a local path)."""
        return self.config.model_name or DEFAULT_MODEL

    def setup(self) -> None:
        """Check the weights fit, then load them; a runner that only fine-tunes loads nothing up front."""
        if not self.config.predicts:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = self.model_name
        placement = plan_placement(self.config)
        placement.check_fits(count_parameters(name), name)
        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModelForCausalLM.from_pretrained(name, **placement.load_kwargs())
        if placement.device == "cpu":
            self.model.to("cpu")
        self.model.eval()
        logger.info("%s loaded in %.1fs on %s (%s%s)", name, time.monotonic() - started, placement.device,
                    placement.dtype, f", {placement.quantize}" if placement.quantize else "")
        if self.config.parallel_auto:
            self.max_parallel = slots_for_model(self.model, placement.device, headroom=self.config.kv_headroom,
                                                cap=self.config.max_parallel)
        self.adapters = AdapterCache(self.model)
        self.generator = TextGenerator(self.model, self.tokenizer, device=placement.input_device,
                                       max_batch=self.max_parallel, adapters=self.adapters)
        self.tool_format = tool_format(self.config.tool_format, self.tokenizer)

    @property
    def grammars(self) -> Grammars:
        """The loaded tokenizer's grammars (llguidance's tokenizer and the compiled grammars' cache)."""
        if self.generator is None:
            raise RuntimeError("grammars asked for before setup()")
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.generator.vocab_size, self.generator.eos_ids)
            return self._grammars

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Answer the conversation, streaming the reply."""
        if task.mode != "create":
            raise BadTaskInput(f"task {task.id}: predict() answers create tasks, not {task.mode!r} (see train())")
        if self.generator is None:
            raise RuntimeError("predict() called before setup()")
        rules = ReplyRules.from_params(task.params)
        fmt = self.tool_format or tool_format("hermes", self.tokenizer)
        hold = HoldBack(fmt.marker, report.token) if rules.may_call and not rules.forces_calls else None
        on_text: Callable[[str], None] = report.token
        if rules.forces_calls:
            on_text = _silent  # tool-call text is never streamed as content
        elif hold is not None:
            on_text = hold.feed
        logprobs = param.flag(task.params, "logprobs", False)
        top_logprobs = param.integer(task.params, "top_logprobs", 0, low=0)
        if top_logprobs > MOST_TOP_LOGPROBS:
            raise param.bad_param("top_logprobs", f"an integer from 0 to {MOST_TOP_LOGPROBS}", top_logprobs)
        with self.generator.arriving():
            grammar = reply_grammar(rules, fmt)
            request = GenerationRequest(
                prompt_ids=self.prompt_ids(task.input.get("messages"), task.params.get("tools") or ()),
                params=SamplingParams.from_params(task.params),
                on_text=on_text,
                cancelled=lambda: report.cancelled,
                constraint=self.grammars.constraint(grammar) if grammar else None,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                keep_special_tokens=rules.may_call and fmt.marker_token is not None,
            )
            if task.adapter:
                # Fetched once per runner (cached on disk by checksum), loaded once while it stays in the LRU.
                request.adapter = adapter_key(task.adapter)
                request.adapter_path = str(report.files.fetch_dir(task.adapter))
            self.generator.submit(request)
        self.generator.wait(request)
        if request.finish_reason == "cancelled":
            report.check()  # raises TaskCancelled: the loop tells the API
        calls = read_calls(fmt, request.text, task.id) if rules.may_call else None
        # A call cut short (by max_new_tokens) is neither calls nor text: the reply is empty, its finish_reason
        # says why, and the raw call layout never reaches the user as content.
        began_call = rules.forces_calls or (hold is not None and hold.decided == "call")
        if hold is not None and not calls and not began_call:
            hold.flush()  # a text reply's last characters, held while they might have begun a call
        prompt_tokens = len(request.prompt_ids)
        result: dict[str, Any] = {
            "text": "" if calls or began_call else request.text,
            "finish_reason": "tool_calls" if calls else request.finish_reason,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": request.completion_tokens,
                      "total_tokens": prompt_tokens + request.completion_tokens},
            "seed": request.params.seed,
        }
        if calls:
            result["tool_calls"] = [call.as_json() for call in calls]
        if logprobs:
            result["logprobs"] = request.token_logprobs
        return result

    def train(self, task: Task, report: Report) -> dict[str, Any]:
        """Fine-tune a LoRA adapter on the task's conversations, upload it, and summarise the run."""
        if task.mode != FINETUNE:
            raise BadTaskInput(f"task {task.id}: train() takes finetune tasks, not {task.mode!r} (see predict())")
        from runner.backends.mistral_finetune import train_lora

        return train_lora(task, report, config=self.config)

    def prompt_ids(self, messages: Any, tools: Any = ()) -> list[int]:
        """The whole conversation (and the tools it may call) through the tokenizer's chat template, ready for
        the reply."""
        conversation = conversation_of(messages)
        tools = list(tools or ())
        with_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in conversation)
        if with_tools and template_takes_tools(self.tokenizer):
            return self._with_template(template_messages(conversation), tools=tools or None)
        if with_tools:
            conversation = default_layout(conversation, tools, self.tool_format or tool_format("hermes",
                                                                                               self.tokenizer))
        if self.tokenizer.chat_template is None:  # a base model: a plain transcript it can continue
            text = "".join(f"{m['role']}: {m['content']}\n" for m in conversation) + "assistant:"
            return [int(i) for i in self.tokenizer(text)["input_ids"]]
        from jinja2 import TemplateError

        if conversation[0]["role"] == "system" and len(conversation) > 1 and conversation[1]["role"] == "user":
            try:
                return self._apply_template(conversation)
            except TemplateError:
                # Mistral-7B-Instruct-v0.1's own template takes no system role: fold it into the first turn.
                system, first, *rest = conversation
                conversation = [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]
        return self._with_template(conversation)

    def _with_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        from jinja2 import TemplateError

        try:
            return self._apply_template(conversation, **kwargs)
        except TemplateError as exc:  # the template's raise_exception(): roles out of order, say
            raise BadTaskInput(f"input.messages: the model's chat template refuses this conversation: {exc}") from exc

    def _apply_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, **kwargs)
        if hasattr(ids, "keys"):  # a BatchEncoding, as newer transformers return by default
            ids = ids["input_ids"]
        return [int(i) for i in ids]


def conversation_of(messages: Any) -> list[dict[str, Any]]:
    """`input.messages` as role/content pairs (with an assistant's `tool_calls` and a tool message's
    `tool_call_id` kept); BadTaskInput unless it is a non-empty list of messages."""
    if not isinstance(messages, list) or not messages:
        raise BadTaskInput("input.messages: a text task needs a list with at least one message")
    conversation = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role", "user"), str):
            raise BadTaskInput(f"input.messages[{index}]: not a message (an object with a role and content)")
        turn: dict[str, Any] = {"role": message.get("role", "user"), "content": str(message.get("content") or "")}
        for key in ("tool_calls", "tool_call_id"):
            if message.get(key):
                turn[key] = message[key]
        conversation.append(turn)
    return conversation


def _silent(text: str) -> None:
    """Streams nothing: a reply that must be tool calls."""
