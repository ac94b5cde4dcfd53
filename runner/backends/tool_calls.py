"""Tool calls in a chat model's own layout: how tools reach the prompt, how calls look in its output, how they are read.

Two layouts (the runner's --tool-format; `auto` picks mistral when the tokenizer has a `[TOOL_CALLS]` token):

- hermes: one block per call, `<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>`,
  blocks separated by a newline;
- mistral: `[TOOL_CALLS] [{"name":"get_weather","arguments":{"city":"Paris"}}, {...}]`.

The prompt: when the model's chat template mentions `tools`, the tools (OpenAI's `{"type": "function",
"function": {...}}` objects, as transformers documents them) go through `apply_chat_template(..., tools=...)`
and history messages keep their `tool_calls` / `tool` shapes. Otherwise the default layout below: one system
message (the user's system text first) lists the tools as JSON lines inside `<tools></tools>` and says how to
call them; an earlier assistant reply with `tool_calls` renders as its call blocks after its content, and a
`tool` message as a user turn `<tool_response>...</tool_response>` (adjacent user turns joined, as templates
that insist on alternating roles need).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("auto", "hermes", "mistral")
MISTRAL_MARKER = "[TOOL_CALLS]"
_ID_CHARS = string.ascii_letters + string.digits

DEFAULT_INSTRUCTIONS = (
    "You may call one or more functions to assist with the user query. You are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n{how}"
)


def compact(value: Any) -> str:
    """JSON without spaces, as the constrained replies are written."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class ToolCall:
    """One call read from a reply: `arguments` is the JSON text of an object."""

    id: str
    name: str
    arguments: str

    def as_json(self) -> dict[str, str]:
        """As the runner's result lists it."""
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


def call_id(task_id: int | str, index: int) -> str:
    """`call_<task id>_<index>`: unique across a session's tasks, and stable when a task is retried."""
    return f"call_{task_id}_{index}"


class ToolFormat:
    """How one model family writes calls: its marker, the Lark rule of its calls, a parser and a renderer."""

    name = ""
    marker = ""  # the text every reply that calls starts with

    def __init__(self, marker_token: int | None = None) -> None:
        # When the marker is a special token of its own (Mistral's [TOOL_CALLS]), grammars name it by id
        # and replies must be decoded with special tokens kept, or the marker vanishes from the text.
        self.marker_token = marker_token

    def calls_rule(self, call: str, parallel: bool) -> str:
        """The Lark rule `calls` of one reply's calls, each matching the rule named `call`."""
        raise NotImplementedError

    def render(self, calls: list[dict[str, Any]]) -> str:
        """Calls (name, arguments as an object) as the model writes them, for history messages."""
        raise NotImplementedError

    def how_to_call(self) -> str:
        """The default layout's sentence on how to write a call."""
        raise NotImplementedError

    def parse(self, text: str) -> list[tuple[str, dict[str, Any]]] | None:
        """(name, arguments) of every call in a reply that is calls; None when it is not."""
        raise NotImplementedError

    def _lark_marker(self) -> str:
        return f"<[{self.marker_token}]>" if self.marker_token is not None else json.dumps(self.marker)


class Hermes(ToolFormat):
    """`<tool_call>{...}</tool_call>` blocks (Hermes, Qwen), one per call."""

    name = "hermes"
    marker = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def calls_rule(self, call: str, parallel: bool) -> str:
        block = f'{self._lark_marker()} {call} "</tool_call>"'
        if not parallel:
            return f"calls: {block}\n"
        return f'calls: block ("\\n" block)*\nblock: {block}\n'

    def render(self, calls: list[dict[str, Any]]) -> str:
        return "\n".join(f"{self.marker}{compact(call)}</tool_call>" for call in calls)

    def how_to_call(self) -> str:
        return ("For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n"
                '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>')

    def parse(self, text: str) -> list[tuple[str, dict[str, Any]]] | None:
        stripped = text.strip()
        if not stripped.startswith(self.marker):
            return None
        blocks = self._block.findall(stripped)
        if not blocks or self._block.sub("", stripped).strip():
            return None  # an unfinished block, or text between the calls
        return _named_calls(blocks)


class Mistral(ToolFormat):
    """`[TOOL_CALLS] [{...}, ...]`, Mistral's layout (the marker a special token in its v3 tokenizers)."""

    name = "mistral"
    marker = MISTRAL_MARKER

    def calls_rule(self, call: str, parallel: bool) -> str:
        more = f' ("," " " {call})*' if parallel else ""
        return f'calls: {self._lark_marker()} " [" {call}{more} "]"\n'

    def render(self, calls: list[dict[str, Any]]) -> str:
        return f"{self.marker} [{', '.join(compact(call) for call in calls)}]"

    def how_to_call(self) -> str:
        return ("To call functions, reply with only a JSON list of calls after [TOOL_CALLS]:\n"
                '[TOOL_CALLS] [{"name": <function-name>, "arguments": <args-json-object>}]')

    def parse(self, text: str) -> list[tuple[str, dict[str, Any]]] | None:
        stripped = text.strip()
        if not stripped.startswith(self.marker):
            return None
        try:
            calls = json.loads(stripped[len(self.marker):])
        except ValueError:
            return None
        if not isinstance(calls, list) or not calls:
            return None
        return _named_calls(calls)


def _named_calls(items: list[Any]) -> list[tuple[str, dict[str, Any]]] | None:
    """(name, arguments) of call objects (or their JSON texts); None if any is not `{"name", "arguments"}`."""
    found = []
    for item in items:
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except ValueError:
                return None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        found.append((item["name"], arguments))
    return found


def tool_format(setting: str, tokenizer: Any) -> ToolFormat:
    """The layout for `setting` (hermes, mistral or auto) on this tokenizer."""
    if setting not in FORMATS:
        raise ValueError(f"tool format must be one of {', '.join(FORMATS)}, not {setting!r}")
    if setting == "mistral" or (setting == "auto" and _single_token(tokenizer, MISTRAL_MARKER) is not None):
        return Mistral(_special_token(tokenizer, MISTRAL_MARKER))
    return Hermes(_special_token(tokenizer, Hermes.marker))


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer holds it as one token of its own."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None


def _special_token(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when it is one special token, which decoding drops (a grammar then names it by id)."""
    token = _single_token(tokenizer, text)
    if token is None or tokenizer.decode([token], skip_special_tokens=True):
        return None
    return token


def read_calls(fmt: ToolFormat, text: str, task_id: int | str) -> list[ToolCall] | None:
    """The calls a reply makes, with their ids; None when the reply is not calls."""
    parsed = fmt.parse(text)
    if parsed is None:
        return None
    return [ToolCall(call_id(task_id, index), name, compact(arguments))
            for index, (name, arguments) in enumerate(parsed)]


# The prompt.


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders `tools` itself."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(template.values())
    return isinstance(template, str) and "tools" in template


def _arguments(text: Any) -> Any:
    """History arguments (a JSON string, as OpenAI sends them) as an object where they parse."""
    if isinstance(text, str):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def template_id(call_id: Any) -> str:
    """A call id as chat templates take it: 9 letters and digits, the same for the same id.

    Mistral's templates refuse any other id ("Tool call IDs should be alphanumeric strings with length 9"),
    and neither OpenAI's ids nor Helix's (`call_<task>_<n>`) are; the model never sees more than a handle.
    """
    digest = hashlib.sha256(str(call_id).encode()).digest()
    return "".join(_ID_CHARS[byte % len(_ID_CHARS)] for byte in digest[:9])


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History in transformers' chat-template shape: assistant tool_calls with arguments as objects, call ids
    (and the tool messages' ids of them) as templates take them."""
    shaped = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {"type": "function", "id": template_id(call.get("id")),
                 "function": {"name": call["function"]["name"],
                              "arguments": _arguments(call["function"].get("arguments", "{}"))}}
                for call in message["tool_calls"]]
        if message.get("tool_call_id"):
            message["tool_call_id"] = template_id(message["tool_call_id"])
        shaped.append(message)
    return shaped


def default_layout(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                   fmt: ToolFormat) -> list[dict[str, str]]:
    """The conversation in plain system/user/assistant turns, the tools in the system message (see the module)."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    instructions = DEFAULT_INSTRUCTIONS.format(tools=listed, how=fmt.how_to_call()) if tools else ""
    rest = list(messages)
    system = ""
    if rest and rest[0].get("role") == "system":
        system = str(rest.pop(0).get("content") or "")
    turns: list[dict[str, str]] = []
    if system or instructions:
        turns.append({"role": "system", "content": "\n\n".join(part for part in (system, instructions) if part)})
    for message in rest:
        role, content = message.get("role", "user"), str(message.get("content") or "")
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        elif role == "assistant" and message.get("tool_calls"):
            calls = [{"name": call["function"]["name"],
                      "arguments": _arguments(call["function"].get("arguments", "{}"))}
                     for call in message["tool_calls"]]
            content = "\n".join(part for part in (content, fmt.render(calls)) if part)
        if turns and role == "user" and turns[-1]["role"] == "user" and message.get("role") == "tool":
            turns[-1]["content"] += "\n" + content
        else:
            turns.append({"role": role, "content": content})
    return turns


# Streaming.


class HoldBack:
    """Streams a reply that may turn out to be calls (tool_choice auto): text is held while it may still be the
    start of the call marker, and nothing is streamed once it is a call."""

    def __init__(self, marker: str, emit: Callable[[str], None]) -> None:
        self.marker = marker
        self._emit = emit
        self._held = ""
        self.decided: str | None = None  # None while undecided, then "text" or "call"

    def feed(self, piece: str) -> None:
        """Take a piece of the reply; stream what can no longer be part of a call."""
        if self.decided == "text":
            self._emit(piece)
            return
        if self.decided == "call":
            return
        self._held += piece
        start = self._held.lstrip()
        if start.startswith(self.marker):
            self.decided, self._held = "call", ""
        elif not self.marker.startswith(start):
            self.decided = "text"
            held, self._held = self._held, ""
            self._emit(held)

    def flush(self) -> None:
        """The reply is over: whatever is still held was text after all (a call is never streamed)."""
        if self.decided is None and self._held:
            self.decided = "text"
            held, self._held = self._held, ""
            self._emit(held)
