"""Constrained decoding with llguidance: the grammar a task's reply must match, compiled once, masked per row.

From a task's params (`response_format`, `tools`, `tool_choice`, `parallel_tool_calls`) `reply_grammar()` builds
a Lark grammar (llguidance's dialect, JSON schemas embedded with `%json`):

- json_object: any JSON object; json_schema: the schema;
- tool_choice required or a named function: calls in the model's layout (runner.backends.tool_calls), each naming
  one of the tools (or the named one) with arguments valid against its `parameters`; exactly one call when
  parallel_tool_calls is false;
- auto: either the calls or plain text that does not start with the call marker (or, with a json
  response_format, the JSON reply); none: no tool constraint.

JSON is compact (`whitespace_flexible: false`): a model cannot spend its token budget on spaces.

`Grammars` holds one loaded tokenizer's llguidance tokenizer and its compiled grammars, an LRU keyed by the hash
of the grammar text: the first task with a schema pays the compile (about a millisecond), later ones copy
the compiled matcher. Each row gets its own `RowConstraint` (matcher state), which masks that row's logits
with plain torch ops: llguidance.torch's helper is torch.compile'd and costs ~20 ms per call on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runner.backends import params as param
from runner.backends.tool_calls import ToolFormat
from runner.errors import BadTaskInput

logger = logging.getLogger(__name__)

CACHE_SIZE = 128
JSON_OPTIONS = {"whitespace_flexible": False}
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ReplyRules:
    """What a task's params ask of its reply's shape (the API has checked their shapes)."""

    response_format: str = "text"  # text, json_object or json_schema
    schema: Mapping[str, Any] | None = None  # json_schema's schema
    tools: tuple[Mapping[str, Any], ...] = ()  # the tools' `function` objects
    tool_choice: str = "none"  # none, auto, required, or "function" (the named one: `tool_name`)
    tool_name: str | None = None
    parallel: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ReplyRules:
        """Read a task's params; BadTaskInput names one the runner cannot use."""
        fmt = params.get("response_format") or {"type": "text"}
        if not isinstance(fmt, Mapping) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise param.bad_param("response_format", 'an object whose type is "text", "json_object" or '
                                  '"json_schema"', fmt)
        schema = None
        if fmt["type"] == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema", {})
            if not isinstance(schema, Mapping):
                raise param.bad_param("response_format.json_schema.schema", "a JSON schema object", schema)
        tools = params.get("tools") or []
        if not isinstance(tools, list) or not all(
                isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
                and isinstance(t["function"].get("name"), str) for t in tools):
            raise param.bad_param("tools", 'a list of {"type": "function", "function": {"name": ...}}', tools)
        functions = tuple(tool["function"] for tool in tools)
        choice = params.get("tool_choice") or ("auto" if functions else "none")
        name = None
        if isinstance(choice, Mapping):
            name = (choice.get("function") or {}).get("name")
            if name not in {f["name"] for f in functions}:
                raise param.bad_param("tool_choice", "the name of one of the tools", choice)
            choice = "function"
        elif choice not in CHOICES:
            raise param.bad_param("tool_choice", '"none", "auto", "required" or a named function', choice)
        if choice != "none" and not functions:
            raise param.bad_param("tool_choice", '"none" when no tools are given', choice)
        return cls(response_format=fmt["type"], schema=schema, tools=functions, tool_choice=choice,
                   tool_name=name, parallel=param.flag(params, "parallel_tool_calls", True))

    @property
    def may_call(self) -> bool:
        """Whether the reply may be tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_calls(self) -> bool:
        """Whether the reply must be tool calls (required, or a named function)."""
        return self.may_call and self.tool_choice in ("required", "function")


def _json_schema(schema: Mapping[str, Any]) -> str:
    """A schema as `%json` takes it, with compact JSON asked for."""
    shaped = dict(schema)
    shaped["x-guidance"] = {**(shaped.get("x-guidance") or {}), **JSON_OPTIONS}
    return json.dumps(shaped, ensure_ascii=False)


def call_rule(function: Mapping[str, Any], rule: str) -> list[str]:
    """Lark rules for one call of `function`: `{"name":"<its name>","arguments":<its parameters>}` (compact).

    The arguments are a `%json` of their own, so `parameters` stays the root of its schema: its `$ref`s
    (`#/$defs/...`, `#/properties/...`, `#`) mean what they mean to the API, which checks it alone.
    """
    arguments = dict(function.get("parameters") or {"type": "object"})
    opening = json.dumps('{"name":' + json.dumps(function["name"]) + ',"arguments":')
    return [f'{rule}: {opening} {rule}_arguments "}}"', f"{rule}_arguments: %json {_json_schema(arguments)}"]


def reply_grammar(rules: ReplyRules, fmt: ToolFormat) -> str | None:
    """The Lark grammar a reply must match; None when the reply is free text."""
    json_reply = None
    if rules.response_format == "json_object":
        json_reply = _json_schema({"type": "object"})
    elif rules.response_format == "json_schema":
        json_reply = _json_schema(rules.schema or {})
    if not rules.may_call:
        return f"start: %json {json_reply}\n" if json_reply else None
    functions = [f for f in rules.tools if rules.tool_choice != "function" or f["name"] == rules.tool_name]
    lines = [fmt.calls_rule("call", rules.parallel),
             "call: " + " | ".join(f"call_{index}" for index in range(len(functions)))]
    for index, function in enumerate(functions):
        lines += call_rule(function, f"call_{index}")
    if rules.forces_calls:
        start = "start: calls"
    elif json_reply:
        start = "start: calls | json_reply"
        lines.append(f"json_reply: %json {json_reply}")
    else:
        start = "start: calls | TEXT"
        # Any text but one that starts (after spaces) with the marker; a marker that is a special token of
        # its own cannot occur in a lexeme anyway.
        marker = "" if fmt.marker_token is not None else _regex_literal(fmt.marker)
        lines.append(f"TEXT: /(?s:.+)/ & ~/(?s:\\s*{marker}.*)/" if marker else "TEXT: /(?s:.+)/")
    return "\n".join([start, *lines]) + "\n"


def _regex_literal(text: str) -> str:
    return "".join(f"\\{c}" if c in r"\.^$|?*+()[]{}/" else c for c in text)


def grammar_key(grammar: str) -> str:
    """The cache key of a grammar text."""
    return hashlib.sha256(grammar.encode()).hexdigest()


class RowConstraint:
    """One row's matcher: masks that row's logits to what the grammar allows next, and follows its tokens."""

    def __init__(self, matcher: Any, words: int) -> None:
        import torch

        self.matcher = matcher
        self._words = torch.empty(words, dtype=torch.int32)
        self._bits: dict[Any, Any] = {}

    def mask(self, logits: Any) -> Any:
        """`logits` (1-D, this row's) with every token the grammar refuses at -inf."""
        import torch

        self.matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        device = logits.device
        bits = self._bits.get(device)
        if bits is None:
            bits = self._bits[device] = torch.ones(32, dtype=torch.int32, device=device) << torch.arange(
                32, dtype=torch.int32, device=device)
        words = self._words.to(device)
        allowed = ((words.unsqueeze(-1) & bits) != 0).reshape(-1)[: logits.shape[-1]]
        return logits.masked_fill(~allowed, float("-inf"))

    def consume(self, token_id: int) -> bool:
        """Follow a chosen token; False when the grammar refuses it (the matcher is then in error)."""
        return bool(self.matcher.consume_token(token_id))

    @property
    def stopped(self) -> bool:
        """Whether the grammar is complete and nothing may follow (the row is done)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        """The matcher's error, first line only (the rest is its state dump)."""
        return (self.matcher.get_error() or "").strip().splitlines()[0] if self.matcher.is_error() else ""


class Grammars:
    """One loaded tokenizer's llguidance tokenizer and compiled grammars (an LRU by hash of the grammar text)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int] = (),
                 cache_size: int = CACHE_SIZE) -> None:
        import llguidance.hf

        eos = sorted(eos_ids)
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos or None)
        self.cache_size = cache_size
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # predict() threads compile side by side
        self.hits = 0
        self.misses = 0

    def compile(self, grammar: str) -> Any:
        """The compiled matcher of a Lark grammar, in its start state (do not consume with it: copy it)."""
        import llguidance

        key = grammar_key(grammar)
        with self._lock:
            matcher = self._compiled.get(key)
            if matcher is not None:
                self._compiled.move_to_end(key)
                self.hits += 1
                return matcher
        # Building the matcher compiles the grammar, and leaves it in error when the grammar is invalid.
        matcher = llguidance.LLMatcher(self.tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        if matcher.is_error():
            problem = matcher.get_error().strip()
            first = problem.splitlines()[0] if problem else "invalid grammar"
            raise BadTaskInput(f"the reply's grammar (response_format or tools) cannot be used: {first}")
        with self._lock:
            self.misses += 1
            self._compiled[key] = matcher
            self._compiled.move_to_end(key)
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def constraint(self, grammar: str) -> RowConstraint:
        """A fresh row constraint for a grammar (compiled once, copied per row)."""
        return RowConstraint(self.compile(grammar).deep_copy(), (self.vocab_size + 31) // 32)
