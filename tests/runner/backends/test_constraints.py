"""Constrained replies and logprobs on the tiny random-weight Mistral, whose free text is noise: what the grammar
allows is all it can write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runner.backends.constraints import Grammars, ReplyRules, reply_grammar
from runner.backends.mistral import MistralBackend
from runner.backends.text_generation import GenerationRequest, SamplingParams
from runner.backends.tool_calls import Hermes
from runner.errors import BadTaskInput
from tests.doubles import FakeReport
from tests.runner.backends.text_doubles import text_config, text_task

pytestmark = pytest.mark.timeout(120)

# A few seeds in the fast suite; the many-seeds run (sampling at temperature 1 from noise) is marked slow.
SEED_RUNS = pytest.mark.parametrize("seeds", [range(3), pytest.param(range(3, 23), marks=pytest.mark.slow)],
                                    ids=["few", "many"])
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "colour": {"enum": ["red", "green", "blue"]},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "height", "colour", "member", "tags"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.fixture(scope="module")
def backend(tiny_mistral: Path) -> MistralBackend:
    """The text backend on the tiny model, one task at a time."""
    made = MistralBackend(text_config(tiny_mistral))
    made.setup()
    return made


def predict(backend: MistralBackend, **params: Any) -> tuple[dict[str, Any], FakeReport]:
    report = FakeReport()
    params = {"temperature": 1.0, "max_new_tokens": 300, **params}
    return backend.predict(text_task("Give me the answer as JSON.", **params), report), report


# Seeds 6, 7 and 19 close their object early; the many-seeds run takes whatever comes.
@pytest.mark.parametrize("seeds", [(6, 7, 19), pytest.param(range(20), marks=pytest.mark.slow)], ids=["few", "many"])
def test_json_object_replies_are_json_objects(backend, seeds):
    finished = 0
    for seed in seeds:
        result, report = predict(backend, seed=seed, response_format={"type": "json_object"}, max_new_tokens=150)
        assert "".join(report.tokens) == result["text"]
        if result["finish_reason"] == "length":
            # Noise may fill a string until the budget runs out; what it wrote is still the start of an object.
            assert result["text"].startswith("{")
            continue
        finished += 1
        assert result["finish_reason"] == "stop", result
        assert isinstance(json.loads(result["text"]), dict)
    assert finished >= len(seeds) // 3


@SEED_RUNS
def test_json_schema_replies_validate_against_the_schema(backend, seeds):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in seeds:
        result, _ = predict(backend, seed=seed, response_format=response_format)
        assert result["finish_reason"] == "stop", result
        jsonschema.validate(json.loads(result["text"]), PERSON)


def test_json_is_compact(backend):
    numbers = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"},
                                                "c": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
               "required": ["a", "b", "c"], "additionalProperties": False}
    for seed in range(3):
        result, _ = predict(backend, seed=seed, response_format={"type": "json_schema", "json_schema": {
            "name": "numbers", "schema": numbers}})
        jsonschema.validate(json.loads(result["text"]), numbers)
        assert not any(c.isspace() for c in result["text"]), result["text"]


def check_calls(result: dict[str, Any], report: FakeReport, names: set[str], task_id: int) -> None:
    assert result["finish_reason"] == "tool_calls", result
    assert result["text"] == "" and report.tokens == []
    for index, call in enumerate(result["tool_calls"]):
        assert call["id"] == f"call_{task_id}_{index}"
        assert call["name"] in names
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@SEED_RUNS
def test_required_tool_choice_gives_valid_calls_and_streams_nothing(backend, seeds):
    for seed in seeds:
        report = FakeReport()
        task = text_task("What is the weather?", tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                         seed=seed, temperature=1.0, max_new_tokens=300)
        result = backend.predict(task, report)
        check_calls(result, report, {"get_weather", "get_time"}, task.id)
        assert len(result["tool_calls"]) == 1


def test_a_call_cut_short_by_the_token_budget_is_an_empty_reply_not_its_layout(backend):
    report = FakeReport()
    task = text_task("What is the weather?", tools=TOOLS, tool_choice="required", seed=1, temperature=1.0,
                     max_new_tokens=4)
    result = backend.predict(task, report)
    assert result["finish_reason"] == "length" and result["text"] == "" and "tool_calls" not in result
    assert report.tokens == []


@SEED_RUNS
def test_a_named_tool_choice_calls_that_tool(backend, seeds):
    for seed in seeds:
        report = FakeReport()
        task = text_task("What time is it?", tools=TOOLS, seed=seed, temperature=1.0, max_new_tokens=100,
                         tool_choice={"type": "function", "function": {"name": "get_time"}},
                         parallel_tool_calls=False)
        result = backend.predict(task, report)
        check_calls(result, report, {"get_time"}, task.id)


@SEED_RUNS
def test_auto_gives_text_or_calls_and_streams_only_text(backend, seeds):
    for seed in seeds:
        result, report = predict(backend, seed=seed, tools=TOOLS, max_new_tokens=60)
        if result["finish_reason"] == "tool_calls":
            assert result["text"] == "" and report.tokens == []
        else:
            assert "tool_calls" not in result
            assert not result["text"].lstrip().startswith("<tool_call>")
            assert "".join(report.tokens) == result["text"]


def test_a_constrained_row_leaves_its_neighbours_text_as_it_is_alone(backend):
    generator = backend.generator
    schema_grammar = reply_grammar(ReplyRules.from_params({"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON}}}), Hermes())

    def request(constrained: bool) -> GenerationRequest:
        prompt = backend.prompt_ids([{"role": "user", "content": "tell me a story"}])
        return GenerationRequest(prompt_ids=prompt, params=SamplingParams.from_params(
            {"temperature": 1.0, "seed": 5, "max_new_tokens": 200 if constrained else 40}),
            constraint=backend.grammars.constraint(schema_grammar) if constrained else None)

    alone = request(False)
    generator.run_batch([alone])
    free, constrained = request(False), request(True)
    generator.run_batch([constrained, free])
    assert free.error is None and constrained.error is None
    assert (free.text, free.finish_reason) == (alone.text, alone.finish_reason)
    jsonschema.validate(json.loads(constrained.text), PERSON)
    assert constrained.text != free.text


class _Refusing:
    """A constraint that allows anything and then refuses the token."""

    stopped = False
    error = ""

    def mask(self, logits: Any) -> Any:
        return logits

    def consume(self, token_id: int) -> bool:
        self.error = "refused"
        return False


def test_a_refused_token_fails_that_row_only(backend):
    prompt = backend.prompt_ids([{"role": "user", "content": "hi"}])
    params = SamplingParams.from_params({"max_new_tokens": 10})
    refused = GenerationRequest(prompt_ids=prompt, params=params, constraint=_Refusing())
    fine = GenerationRequest(prompt_ids=prompt, params=params)
    backend.generator.run_batch([refused, fine])
    # The task's own grammar is at fault: BadTaskInput, so the task fails once and is not retried.
    assert isinstance(refused.error, BadTaskInput) and "refused" in str(refused.error)
    assert fine.error is None and fine.finish_reason in ("stop", "length")


def test_the_second_compile_of_a_grammar_is_a_cache_hit(tiny_mistral):
    from transformers import AutoTokenizer

    grammars = Grammars(AutoTokenizer.from_pretrained(tiny_mistral), 400, [2])
    grammar = reply_grammar(ReplyRules.from_params({"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON}}}), Hermes())
    first = grammars.compile(grammar)
    assert (grammars.hits, grammars.misses) == (0, 1)
    assert grammars.compile(grammar) is first
    assert (grammars.hits, grammars.misses) == (1, 1)
    one, two = grammars.constraint(grammar), grammars.constraint(grammar)
    assert one.matcher is not two.matcher  # each row has its own state
    assert (grammars.hits, grammars.misses) == (3, 1)


def test_the_cache_forgets_the_least_recently_used(tiny_mistral):
    from transformers import AutoTokenizer

    grammars = Grammars(AutoTokenizer.from_pretrained(tiny_mistral), 400, [2], cache_size=2)
    texts = [f'start: "{word}"' for word in ("a", "b", "c")]
    grammars.compile(texts[0])
    grammars.compile(texts[1])
    grammars.compile(texts[0])
    grammars.compile(texts[2])  # evicts b, the least recently used
    grammars.compile(texts[0])
    assert grammars.hits == 2
    grammars.compile(texts[1])
    assert grammars.misses == 4


def test_a_grammar_that_fails_to_compile_is_bad_task_input(backend):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    with pytest.raises(BadTaskInput, match="cannot be used: .*objectx"):
        predict(backend, response_format=bad)
    with pytest.raises(BadTaskInput):
        backend.grammars.compile("start: ((")


def test_logprobs_give_one_entry_per_token_with_alternatives(backend):
    result, _ = predict(backend, seed=1, max_new_tokens=12, logprobs=True, top_logprobs=3, temperature=0)
    entries = result["logprobs"]
    assert len(entries) == result["usage"]["completion_tokens"] - (result["finish_reason"] == "stop")
    for entry in entries:
        assert entry["logprob"] <= 0
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(values[0])
        assert entry["token"] == entry["top_logprobs"][0]["token"]


def test_logprobs_follow_the_mask_and_are_absent_unless_asked(backend):
    result, _ = predict(backend, seed=2, logprobs=True, top_logprobs=20, response_format={"type": "json_object"})
    assert result["logprobs"][0]["token"] == "{"
    assert result["logprobs"][0]["logprob"] == pytest.approx(0.0, abs=1e-5)  # the only token allowed
    assert len(result["logprobs"][0]["top_logprobs"]) == 1  # disallowed tokens are not alternatives
    plain, _ = predict(backend, seed=2, max_new_tokens=5)
    assert "logprobs" not in plain
    no_top, _ = predict(backend, seed=2, max_new_tokens=5, logprobs=True)
    assert all(entry["top_logprobs"] == [] for entry in no_top["logprobs"])


def test_tool_choice_naming_an_unknown_tool_is_bad_task_input(backend):
    with pytest.raises(BadTaskInput, match="tool_choice"):
        predict(backend, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


TOOLS_TEMPLATE = (
    "{%- if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{%- for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}CALL:{{ c.function | tojson }}{% endfor %}{% endif %}\n"
    "{%- endfor %}assistant:"
)
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": "", "tool_calls": [
               {"id": "call_1_0", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":1}'}}]},
           {"role": "tool", "tool_call_id": "call_1_0", "content": "sunny"}]


def test_the_prompt_gives_tools_to_a_template_that_takes_them(backend, monkeypatch):
    monkeypatch.setattr(backend.tokenizer, "chat_template", TOOLS_TEMPLATE)
    text = backend.tokenizer.decode(backend.prompt_ids(HISTORY, [WEATHER]))
    assert text.startswith("TOOLS:[")
    assert '"name": "get_weather"' in text
    assert 'CALL:{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}' in text
    assert "tool:sunny" in text and text.endswith("assistant:")


def test_the_prompt_lays_tools_out_itself_for_a_template_without_them(backend):
    text = backend.tokenizer.decode(backend.prompt_ids(HISTORY, [WEATHER]), skip_special_tokens=True)
    assert text.startswith("[INST] You may call one or more functions")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text
    assert '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","days":1}}</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_a_mistral_marker_that_is_a_special_token_is_named_by_id(tiny_mistral):
    from transformers import AutoTokenizer

    from runner.backends.tool_calls import Mistral, read_calls

    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral)
    grammars = Grammars(tokenizer, 400, [2])
    marker = tokenizer.convert_tokens_to_ids("<pad>")  # stands in for [TOOL_CALLS], a special token of its own
    calls = ' [{"name":"get_time","arguments":{"zone":"UTC"}}, {"name":"get_time","arguments":{"zone":"CET"}}]'
    ids = [marker, *tokenizer.encode(calls, add_special_tokens=False)]
    for choice in ("required", "auto"):
        constraint = grammars.constraint(reply_grammar(ReplyRules.from_params({"tools": TOOLS, "tool_choice": choice}),
                                                       Mistral(marker)))
        assert all(constraint.consume(token) for token in ids) and constraint.stopped
    text = tokenizer.decode(ids, skip_special_tokens=False).replace("<pad>", "[TOOL_CALLS]")
    assert [(c.name, c.arguments) for c in read_calls(Mistral(marker), text, 1)] == [
        ("get_time", '{"zone":"UTC"}'), ("get_time", '{"zone":"CET"}')]


def test_a_tools_refs_resolve_against_its_own_parameters(backend):
    # `#/properties/city` and `#` name parts of the tool's parameters, as the API checked them alone.
    tool = {"type": "function", "function": {"name": "route", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city", "via"],
        "properties": {"city": {"type": "string", "maxLength": 8},
                       "via": {"type": "array", "maxItems": 2, "items": {"$ref": "#/properties/city"}}}}}}
    report = FakeReport()
    task = text_task("Route me.", tools=[tool], tool_choice="required", parallel_tool_calls=False, seed=2,
                     temperature=1.0, max_new_tokens=200)
    result = backend.predict(task, report)
    [call] = result["tool_calls"]
    jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])
