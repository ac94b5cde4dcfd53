"""Tool-call layouts: the prompt's default layout, both parsers on hand-written text, auto mode's hold-back."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from runner.backends.tool_calls import (
    Hermes,
    HoldBack,
    Mistral,
    default_layout,
    read_calls,
    template_messages,
    template_takes_tools,
    tool_format,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
HISTORY_CALL = {"id": "call_7_0", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_hermes_reads_one_block_per_call_with_ids_and_compact_arguments():
    text = ('<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    calls = read_calls(Hermes(), text, 42)
    assert [c.as_json() for c in calls] == [
        {"id": "call_42_0", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"id": "call_42_1", "name": "get_time", "arguments": "{}"}]


@pytest.mark.parametrize("text", [
    "Hello, the weather is fine.",
    '<tool_call>{"name":"get_weather","arguments":{"city":"Par',  # cut off by the token budget
    '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call> and some text',
    '<tool_call>{"arguments":{}}</tool_call>',  # no name
    '<tool_call>{"name":"f","arguments":[1]}</tool_call>',  # arguments not an object
])
def test_hermes_finds_no_calls_in_text_or_broken_blocks(text):
    assert read_calls(Hermes(), text, 1) is None


def test_mistral_reads_the_list_after_its_marker():
    text = '[TOOL_CALLS] [{"name":"get_weather","arguments":{"city":"Paris"}}, {"name":"f","arguments":"{\\"a\\": 1}"}]'
    calls = read_calls(Mistral(), text, 9)
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_9_0", "get_weather", {"city": "Paris"}), ("call_9_1", "f", {"a": 1})]
    assert read_calls(Mistral(), "[TOOL_CALLS] [", 9) is None
    assert read_calls(Mistral(), "[TOOL_CALLS] []", 9) is None
    assert read_calls(Mistral(), "Just text", 9) is None


def test_both_layouts_render_what_they_parse():
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]
    for fmt in (Hermes(), Mistral()):
        assert [(c.name, json.loads(c.arguments)) for c in read_calls(fmt, fmt.render(calls), 1)] == [
            (call["name"], call["arguments"]) for call in calls]


def test_default_layout_puts_the_users_system_text_first_then_the_tools():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    turns = default_layout(messages, [WEATHER], Hermes())
    assert [t["role"] for t in turns] == ["system", "user"]
    system = turns[0]["content"]
    assert system.startswith("Be brief.\n\n")
    listed = system[system.index("<tools>\n") + 8: system.index("\n</tools>")]
    assert json.loads(listed) == WEATHER
    assert "<tool_call>" in system
    assert turns[1] == {"role": "user", "content": "Weather in Paris?"}


def test_default_layout_renders_history_calls_and_tool_results():
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "", "tool_calls": [HISTORY_CALL]},
                {"role": "tool", "tool_call_id": "call_7_0", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_7_1", "content": "rainy"}]
    turns = default_layout(messages, [WEATHER], Hermes())
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[2]["content"] == '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    # Two tool results in a row are one user turn, for templates that insist on alternating roles.
    assert turns[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
    mistral = default_layout(messages, [WEATHER], Mistral())
    assert mistral[2]["content"] == '[TOOL_CALLS] [{"name":"get_weather","arguments":{"city":"Paris"}}]'
    assert "[TOOL_CALLS]" in mistral[0]["content"]


def test_template_messages_give_history_arguments_as_objects():
    shaped = template_messages([{"role": "assistant", "content": "", "tool_calls": [HISTORY_CALL]}])
    assert shaped[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_template_takes_tools_only_when_it_mentions_them():
    assert template_takes_tools(SimpleNamespace(chat_template="{% if tools %}{{ tools | tojson }}{% endif %}"))
    assert not template_takes_tools(SimpleNamespace(chat_template="{{ messages }}"))
    assert not template_takes_tools(SimpleNamespace(chat_template=None))


class _Tokenizer:
    """Enough of a tokenizer for tool_format(): one special token, or none."""

    unk_token_id = 0

    def __init__(self, special: dict[str, int]) -> None:
        self.special = special

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.special[text]] if text in self.special else [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        named = {v: k for k, v in self.special.items()}
        return "".join("" if skip_special_tokens and i in named else named.get(i, chr(i)) for i in ids)


def test_auto_picks_mistral_when_the_tokenizer_has_its_marker_token():
    assert tool_format("auto", _Tokenizer({})).name == "hermes"
    found = tool_format("auto", _Tokenizer({"[TOOL_CALLS]": 5}))
    assert (found.name, found.marker_token) == ("mistral", 5)
    assert tool_format("hermes", _Tokenizer({"[TOOL_CALLS]": 5})).name == "hermes"
    assert (tool_format("mistral", _Tokenizer({})).name, tool_format("mistral", _Tokenizer({})).marker_token) == (
        "mistral", None)
    with pytest.raises(ValueError):
        tool_format("other", _Tokenizer({}))


def feed(pieces: list[str], marker: str = "<tool_call>") -> tuple[HoldBack, list[str]]:
    streamed: list[str] = []
    hold = HoldBack(marker, streamed.append)
    for piece in pieces:
        hold.feed(piece)
    return hold, streamed


def test_hold_back_streams_text_once_it_cannot_be_a_call():
    hold, streamed = feed(["<", "ta", "ble> is", " here"])
    assert streamed == ["<ta", "ble> is", " here"]
    assert hold.decided == "text"


def test_hold_back_streams_nothing_of_a_call():
    hold, streamed = feed(["<tool", "_call>", '{"name":', '"f"}</tool_call>'])
    assert streamed == [] and hold.decided == "call"
    hold.flush()
    assert streamed == []


def test_hold_back_holds_a_marker_prefix_until_the_end_then_streams_it():
    hold, streamed = feed([" <tool"])
    assert streamed == [] and hold.decided is None
    hold.flush()
    assert streamed == [" <tool"]


def test_hold_back_streams_plain_text_at_once():
    _, streamed = feed(["Hello", " world"])
    assert streamed == ["Hello", " world"]


def test_call_ids_reach_a_template_as_nine_letters_and_digits_the_same_for_call_and_result():
    from runner.backends.tool_calls import template_messages

    shaped = template_messages([
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_12_0", "type": "function",
                                                             "function": {"name": "f", "arguments": '{"a":1}'}}]},
        {"role": "tool", "tool_call_id": "call_12_0", "content": "done"}])
    call_id = shaped[0]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum() and shaped[1]["tool_call_id"] == call_id
    assert shaped[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
