"""The text backend on the tiny Mistral: params, streaming, chat template, cancel, batching, adapters, finetune."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from runner.backends.mistral import MistralBackend
from runner.backends.text_generation import GenerationRequest, SamplingParams
from runner.errors import BadTaskInput, TaskCancelled
from tests.doubles import FakeFiles, FakeReport
from tests.runner.backends.text_doubles import make_adapter, text_config, text_task

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def make_text_backend(tiny_mistral: Path) -> Callable[..., MistralBackend]:
    """Build and set up a MistralBackend on the tiny model (config overrides as keywords)."""
    def make(**overrides: Any) -> MistralBackend:
        backend = MistralBackend(text_config(tiny_mistral, **overrides))
        backend.setup()
        return backend

    return make


@pytest.fixture(scope="module")
def text_backend(make_text_backend) -> MistralBackend:
    """One backend on the tiny model, one task at a time."""
    return make_text_backend()


def run(backend: MistralBackend, task, report: FakeReport | None = None) -> tuple[dict[str, Any], FakeReport]:
    report = report or FakeReport()
    return backend.predict(task, report), report


SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "max_new_tokens": 24}


def test_same_seed_same_text_and_another_seed_another(text_backend):
    first, _ = run(text_backend, text_task("tell me a story", seed=7, **SAMPLED))
    again, _ = run(text_backend, text_task("tell me a story", seed=7, **SAMPLED))
    other, _ = run(text_backend, text_task("tell me a story", seed=8, **SAMPLED))
    assert first["text"] == again["text"] and first["text"]
    assert other["text"] != first["text"]
    assert first["seed"] == 7


def test_max_new_tokens_is_honoured(text_backend):
    for limit in (1, 5, 17):
        result, _ = run(text_backend, text_task("count to ten", max_new_tokens=limit, repetition_penalty=1.3))
        assert result["usage"]["completion_tokens"] <= limit
        if result["finish_reason"] == "length":
            assert result["usage"]["completion_tokens"] == limit


def test_usage_counts_prompt_and_completion(text_backend):
    task = text_task("hello", max_new_tokens=9)
    result, _ = run(text_backend, task)
    prompt = text_backend.prompt_ids(task.input["messages"])
    usage = result["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result["finish_reason"] in ("stop", "length")


def test_stop_string_cuts_the_text_and_is_never_streamed(text_backend):
    plain, _ = run(text_backend, text_task("what is the capital", max_new_tokens=40, repetition_penalty=1.2))
    text = plain["text"]
    assert len(text) > 12, text
    stop = text[8:12]
    cut = text[: text.index(stop)]
    result, report = run(text_backend, text_task("what is the capital", max_new_tokens=40, repetition_penalty=1.2,
                                                 stop=[stop, "never appears \u2603"]))
    assert result["text"] == cut
    assert result["finish_reason"] == "stop"
    assert "".join(report.tokens) == cut


def test_streamed_tokens_concatenate_to_the_final_text(text_backend):
    result, report = run(text_backend, text_task("Une phrase en français", seed=3, **{**SAMPLED, "max_new_tokens": 48}))
    assert len(report.tokens) > 5
    assert all(report.tokens)
    assert "".join(report.tokens) == result["text"]


def test_multi_turn_chat_goes_through_the_chat_template(text_backend):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi there."},
                {"role": "user", "content": "How are you?"}]
    prompt = text_backend.tokenizer.decode(text_backend.prompt_ids(messages))
    assert prompt == "<s>[INST] Be brief.\n\nHello! [/INST] Hi there.</s>[INST] How are you? [/INST]"
    result, _ = run(text_backend, text_task(messages, max_new_tokens=4))
    assert result["usage"]["prompt_tokens"] == len(text_backend.prompt_ids(messages))
    # The earlier turns change the reply: the model saw them.
    alone, _ = run(text_backend, text_task("How are you?", max_new_tokens=12))
    whole, _ = run(text_backend, text_task(messages, max_new_tokens=12))
    assert alone["text"] != whole["text"]


STRICT_TEMPLATE = (  # like Mistral-7B-Instruct-v0.1's: no system role, user and assistant alternating
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_a_system_message_is_folded_in_when_the_template_takes_none(text_backend, monkeypatch):
    monkeypatch.setattr(text_backend.tokenizer, "chat_template", STRICT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    assert text_backend.tokenizer.decode(text_backend.prompt_ids(messages)) == "<s>[INST] Be brief.\n\nHello! [/INST]"


def test_a_model_without_a_chat_template_gets_a_plain_transcript(text_backend, monkeypatch):
    monkeypatch.setattr(text_backend.tokenizer, "chat_template", None)
    messages = [{"role": "user", "content": "Hello!"}]
    assert text_backend.tokenizer.decode(text_backend.prompt_ids(messages)) == "<s>user: Hello!\nassistant:"


def test_cancel_stops_a_long_generation_within_a_few_tokens(text_backend):
    report = FakeReport(cancel_after_tokens=3)
    with pytest.raises(TaskCancelled):
        text_backend.predict(text_task("go on forever", max_new_tokens=4000), report)
    assert len(report.tokens) == 3


def test_a_cancel_seen_between_steps_stops_too(text_backend):
    class CancelledOnSixthLook(FakeReport):
        looks = 0

        @property
        def cancelled(self) -> bool:
            self.looks += 1
            if self.looks > 5:
                self.cancel()
            return self.stop_reason is not None

    report = CancelledOnSixthLook()
    with pytest.raises(TaskCancelled):
        text_backend.predict(text_task("go on", max_new_tokens=4000), report)
    assert report.looks == 6  # looked once per step, stopped at the first look that saw it
    assert len(report.tokens) <= 5


def test_batch_of_four_gives_each_row_the_text_it_gets_alone(text_backend):
    generator = text_backend.generator
    chats = ["hi", "tell me a long story about dragons", "what is two plus two? please answer", "thanks"]
    params = [{"max_new_tokens": 20}, {**SAMPLED, "seed": 1}, {"max_new_tokens": 7, "repetition_penalty": 1.4},
              {**SAMPLED, "seed": 2, "max_new_tokens": 30, "stop": ["e"]}]

    def request(index: int) -> GenerationRequest:
        pieces: list[str] = []
        req = GenerationRequest(prompt_ids=text_backend.prompt_ids([{"role": "user", "content": chats[index]}]),
                                params=SamplingParams.from_params(params[index]), on_text=pieces.append)
        req.pieces = pieces  # type: ignore[attr-defined]
        return req

    alone = []
    for index in range(4):
        req = request(index)
        generator.run_batch([req])
        alone.append(req)
    together = [request(index) for index in range(4)]
    generator.run_batch(together)
    for single, batched in zip(alone, together, strict=True):
        assert batched.error is None
        assert (batched.text, batched.finish_reason, batched.completion_tokens) == (
            single.text, single.finish_reason, single.completion_tokens)
        assert "".join(batched.pieces) == batched.text  # type: ignore[attr-defined]
    assert len({r.completion_tokens for r in together}) > 1  # rows did finish on their own


def test_requests_joining_a_running_batch_get_the_text_they_get_alone(text_backend):
    from runner.backends.text_generation import TextGenerator

    chats = ["hi", "a much longer question about the capital of France and its rivers", "thanks a lot"]
    params = [{"max_new_tokens": 30}, {**SAMPLED, "seed": 4}, {"max_new_tokens": 12, "repetition_penalty": 1.3}]

    def request(index: int) -> GenerationRequest:
        return GenerationRequest(prompt_ids=text_backend.prompt_ids([{"role": "user", "content": chats[index]}]),
                                 params=SamplingParams.from_params(params[index]))

    alone = []
    for index in range(3):
        alone.append(request(index))
        text_backend.generator.run_batch([alone[-1]])
    engine = TextGenerator(text_backend.model, text_backend.tokenizer, device="cpu", max_batch=4)
    first, late = request(0), [request(1), request(2)]
    for req in late:
        engine._queue.put(req)  # already waiting when the first one starts: they join after its first step
    engine.run_batch([first], admit=True)
    for single, joined in zip(alone, [first, *late], strict=True):
        assert joined.done.is_set() and joined.error is None
        assert (joined.text, joined.completion_tokens) == (single.text, single.completion_tokens)


def test_parallel_predicts_each_get_their_own_reply(make_text_backend, text_backend):
    parallel = make_text_backend(max_parallel=4)
    tasks = [text_task(f"question number {n}", seed=n, **SAMPLED) for n in range(4)]
    expected = [run(text_backend, task)[0]["text"] for task in tasks]
    results: dict[int, Any] = {}

    def work(index: int) -> None:
        results[index] = run(parallel, tasks[index])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for index in range(4):
        result, report = results[index]
        assert result["text"] == expected[index]
        assert "".join(report.tokens) == result["text"]
    parallel.generator.close()


# Adapters.


@pytest.fixture(scope="module")
def adapters(tiny_mistral: Path, tmp_path_factory) -> FakeFiles:
    files = FakeFiles()
    root = tmp_path_factory.mktemp("adapters")
    for index in (1, 2, 3):
        files.dirs[index] = make_adapter(tiny_mistral, root / f"a{index}", seed=index)
    return files


def adapter_ref(index: int) -> dict[str, Any]:
    return {"id": index, "name": "adapter.zip", "sha256": f"{index:064x}", "size": 1,
            "content_type": "application/zip"}


def test_sessions_with_and_without_an_adapter_each_get_the_right_one(make_text_backend, adapters):
    backend = make_text_backend()
    question = "who are you?"
    base_before, _ = run(backend, text_task(question, max_new_tokens=16))
    tuned, _ = run(backend, text_task(question, max_new_tokens=16, adapter=adapter_ref(1)), FakeReport(adapters))
    base_after, _ = run(backend, text_task(question, max_new_tokens=16))
    tuned_again, _ = run(backend, text_task(question, max_new_tokens=16, adapter=adapter_ref(1)),
                         FakeReport(adapters))
    other, _ = run(backend, text_task(question, max_new_tokens=16, adapter=adapter_ref(2)), FakeReport(adapters))
    assert tuned["text"] != base_before["text"]
    assert base_after["text"] == base_before["text"]  # no adapter left over from the session before
    assert tuned_again["text"] == tuned["text"]
    assert other["text"] not in (tuned["text"], base_before["text"])
    assert backend.adapters.loads == 2  # the first adapter stayed in memory: loaded once


def test_adapter_output_matches_the_adapter_merged_into_a_fresh_model(make_text_backend, adapters, tiny_mistral,
                                                                      tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mistral), adapters.dirs[3])
    merged.merge_and_unload().save_pretrained(tmp_path / "merged")
    backend = make_text_backend()
    backend.tokenizer.save_pretrained(tmp_path / "merged")
    reference = MistralBackend(text_config(tmp_path / "merged"))
    reference.setup()
    tuned, _ = run(backend, text_task("hello", max_new_tokens=16, adapter=adapter_ref(3)), FakeReport(adapters))
    expected, _ = run(reference, text_task("hello", max_new_tokens=16))
    assert tuned["text"] == expected["text"]


def test_least_recently_used_adapter_is_evicted(make_text_backend, adapters):
    backend = make_text_backend()
    backend.adapters.capacity = 2
    for index in (1, 2, 1, 3):
        run(backend, text_task("hi", max_new_tokens=2, adapter=adapter_ref(index)), FakeReport(adapters))
    assert backend.adapters.loaded == [adapter_ref(1)["sha256"], adapter_ref(3)["sha256"]]
    assert backend.adapters.loads == 3



def test_requests_with_different_adapters_run_one_batch_after_another(make_text_backend, adapters, monkeypatch):
    from runner.adapters import adapter_key
    from runner.backends.text_generation import TextGenerator

    backend = make_text_backend(max_parallel=4)
    engine = TextGenerator(backend.model, backend.tokenizer, device="cpu", max_batch=4, adapters=backend.adapters)
    order = [None, 1, None, 1, 2]

    def request(index: int | None) -> GenerationRequest:
        req = GenerationRequest(prompt_ids=backend.prompt_ids([{"role": "user", "content": "who are you?"}]),
                                params=SamplingParams.from_params({"max_new_tokens": 12}))
        if index is not None:
            req.adapter = adapter_key(adapter_ref(index))
            req.adapter_path = str(adapters.dirs[index])
        return req

    alone = []
    for index in order:
        alone.append(request(index))
        engine.run_batch([alone[-1]])
    batches: list[list[str | None]] = []
    real_run_batch = engine.run_batch

    def spy(requests, admit=False):
        members = list(requests)
        batches.append(members)
        real_run_batch(members, admit=admit)

    monkeypatch.setattr(engine, "run_batch", spy)
    together = [request(index) for index in order]
    for req in together:
        engine._queue.put(req)  # all waiting before the engine starts gathering
    engine._start_engine()
    for req in together:
        assert req.done.wait(60) and req.error is None
    engine.close()

    # Each batch ran with one adapter; the rows of the first adapter's batch came first, then the others'.
    adapters_per_batch = [{r.adapter for r in batch} for batch in batches]
    assert all(len(kinds) == 1 for kinds in adapters_per_batch)
    assert [len(batch) for batch in batches] == [2, 2, 1]
    assert [r.text for r in together] == [r.text for r in alone]
    assert len({r.text for r in together}) == 3  # base, adapter 1 and adapter 2 each answer differently


# The contract: predict() for create tasks, train() for finetune tasks, bad input never retried.


def test_finetune_mode_loads_nothing_holds_one_task_and_trains_with_train_lora(tiny_mistral, monkeypatch):
    from runner.backends import mistral_finetune

    calls = []
    monkeypatch.setattr(mistral_finetune, "train_lora",
                        lambda task, report, config: calls.append((task.id, config)) or {"text": "trained"})
    config = text_config(tiny_mistral, mode="finetune", max_parallel=4)
    backend = MistralBackend(config)
    backend.setup()
    assert backend.model is None and backend.max_parallel == 1
    task = text_task("x", mode="finetune")
    assert backend.train(task, FakeReport()) == {"text": "trained"}
    assert calls == [(task.id, config)]


def test_create_mode_batches_as_many_as_the_runner_holds(tiny_mistral):
    assert MistralBackend(text_config(tiny_mistral, max_parallel=4)).max_parallel == 4


def test_predict_refuses_a_finetune_task_and_train_a_create_task(text_backend):
    with pytest.raises(BadTaskInput, match="predict"):
        text_backend.predict(text_task("x", mode="finetune"), FakeReport())
    with pytest.raises(BadTaskInput, match="train"):
        text_backend.train(text_task("x"), FakeReport())


@pytest.mark.parametrize(("params", "named"), [
    ({"max_new_tokens": "lots"}, "max_new_tokens"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 2.5}, "top_k"),
    ({"repetition_penalty": -1}, "repetition_penalty"), ({"seed": "lucky"}, "seed"),
    ({"do_sample": "false"}, "do_sample"), ({"stop": ["ok", 3]}, "stop"),
])
def test_a_param_that_cannot_be_used_is_bad_input_naming_it(text_backend, params, named):
    report = FakeReport()
    with pytest.raises(BadTaskInput, match=f"param '{named}'"):
        text_backend.predict(text_task("hello", **params), report)
    assert report.events == []


@pytest.mark.parametrize("messages", [[], None, "hello", [["user", "hello"]]])
def test_a_task_without_a_list_of_messages_is_bad_input(text_backend, messages):
    task = replace(text_task("x"), input={"messages": messages})
    with pytest.raises(BadTaskInput, match="input.messages"):
        text_backend.predict(task, FakeReport())


def test_a_conversation_the_chat_template_refuses_is_bad_input(text_backend, monkeypatch):
    monkeypatch.setattr(text_backend.tokenizer, "chat_template", STRICT_TEMPLATE)
    messages = [{"role": "user", "content": "Hello!"}, {"role": "user", "content": "Again!"}]
    with pytest.raises(BadTaskInput, match="chat template refuses"):
        text_backend.predict(text_task(messages), FakeReport())


def test_an_adapter_that_is_not_one_is_bad_input_and_the_next_task_runs(make_text_backend, tmp_path):
    backend = make_text_backend()
    files = FakeFiles()
    files.dirs[9] = tmp_path  # no adapter_config.json in it
    with pytest.raises(BadTaskInput, match="adapter"):
        backend.predict(text_task("hi", max_new_tokens=2, adapter=adapter_ref(9)), FakeReport(files))
    result, _ = run(backend, text_task("hi", max_new_tokens=2))
    assert result["usage"]["completion_tokens"] >= 1
