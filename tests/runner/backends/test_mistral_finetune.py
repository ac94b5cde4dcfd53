"""axolotl LoRA fine-tuning of the tiny Mistral on CPU: structured progress, a working adapter, cancel, bad data."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from runner.backends.mistral_finetune import (
    FinetuneError,
    ProgressReader,
    TrainingParams,
    TrainingSettings,
    axolotl_config,
    log_tail,
    train_lora,
)
from runner.config import RunnerConfig
from runner.errors import BadTaskInput, TaskCancelled
from runner.files import unzip_safely
from runner.messages import Task
from tests.doubles import FakeFiles, FakeReport

# Tiny batches and sequences: a step takes about a second on the tiny model.
SETTINGS = TrainingSettings(sequence_len=128, micro_batch_size=2, gradient_accumulation_steps=1, lora_dropout=0.0,
                            warmup_ratio=0.0)
# A large learning rate so a few steps visibly move the random model.
TRAIN = {"max_steps": 4, "learning_rate": 0.05, "lora_r": 8, "lora_alpha": 16, "seed": 3}
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def conversations(count: int = 12) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "system", "content": "Answer in one short sentence."},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. Paris is in France."}]}
            for i in range(count)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def finetune_task(refs: list[dict[str, Any]], **params: Any) -> Task:
    return Task(id=7, session_id=7, interaction_id=7, mode="finetune", type="text", model_name="tiny", attempt=1,
                input={"files": refs, "examples": 12}, params=params)


def runner_config(model: Path | str, work: Path) -> RunnerConfig:
    return RunnerConfig(api_url="http://helix.test", token="hxr_test", mode="finetune", type="text",
                        model_name=str(model), backend="mistral", device="cpu", cache_dir=str(work / "cache"),
                        work_dir=str(work / "work"))


_baseline: set[int] = set()


@pytest.fixture(autouse=True)
def _processes_before() -> None:
    """What this process had running before the test (a session's browser, say): not the test's to clean up."""
    _baseline.clear()
    _baseline.update(p.pid for p in psutil.Process().children(recursive=True))


def children() -> list[psutil.Process]:
    """Processes this test started that are still there."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in _baseline]


@pytest.fixture(scope="module")
def trained(tiny_mistral: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fine-tune of the tiny model, shared by the tests that look at its outcome."""
    root = tmp_path_factory.mktemp("finetune")
    files = FakeFiles(root / "store")
    ref = files.add(write_jsonl(root / "train.jsonl", conversations()))
    report = FakeReport(files)
    config = runner_config(tiny_mistral, root)
    result = train_lora(finetune_task([ref], **TRAIN), report, config=config, settings=SETTINGS)
    adapter = root / "adapter"
    unzip_safely(files.stored[result["adapter_file_id"]]["path"], adapter)
    return {"result": result, "report": report, "adapter": adapter, "config": config}


@pytest.mark.slow
def test_progress_arrives_step_by_step_with_the_loss(trained):
    events = trained["report"].progress_events

    assert events[0] == {"step": 0, "total": TRAIN["max_steps"], "message": "training"}
    steps = events[1:]
    assert [e["step"] for e in steps] == list(range(1, TRAIN["max_steps"] + 1))
    assert all(e["total"] == TRAIN["max_steps"] and e["message"] == "training" for e in steps)
    assert all(isinstance(e["loss"], float) and e["loss"] > 0 for e in steps)


@pytest.mark.slow
def test_result_summarises_the_run_and_names_the_uploaded_adapter(trained):
    result, report = trained["result"], trained["report"]

    assert result["steps"] == TRAIN["max_steps"]
    assert result["loss"] == report.progress_events[-1]["loss"]
    assert result["text"].startswith(f"Fine-tuned {trained['config'].model_name} for {TRAIN['max_steps']} steps")
    assert sorted(p.name for p in trained["adapter"].iterdir()) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]
    assert any("LoRA" in line for line in report.logs)


@pytest.mark.slow
def test_scratch_space_is_cleaned_up_and_no_process_is_left(trained):
    assert list(Path(trained["config"].work_path).iterdir()) == []
    assert children() == []


@pytest.mark.slow
def test_adapter_loads_with_peft_and_changes_the_answer(trained, tiny_mistral):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral)
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)

    def answer(model) -> tuple[torch.Tensor, str]:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
            torch.manual_seed(5)
            out = model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=20,
                                 pad_token_id=tokenizer.pad_token_id)
        return logits, tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    base_logits, base_text = answer(AutoModelForCausalLM.from_pretrained(tiny_mistral).eval())
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mistral), trained["adapter"]).eval()
    tuned_logits, tuned_text = answer(tuned)

    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)
    assert tuned_text != base_text


@pytest.mark.slow
def test_cancel_terminates_the_training_process(tiny_mistral, tmp_path):
    files = FakeFiles(tmp_path / "store")
    ref = files.add(write_jsonl(tmp_path / "train.jsonl", conversations()))
    report = FakeReport(files, cancel_at_step=1)
    config = runner_config(tiny_mistral, tmp_path)

    with pytest.raises(TaskCancelled):
        train_lora(finetune_task([ref], **{**TRAIN, "max_steps": 10_000}), report, config=config,
                   settings=SETTINGS)

    assert report.progress_events[-1]["step"] == 1  # stopped long before the 10,000th step
    assert children() == []
    assert list(Path(config.work_path).iterdir()) == []
    assert [ref["id"]] == list(files.stored)  # nothing uploaded


def test_bad_lines_are_named_before_anything_runs(tmp_path):
    files = FakeFiles(tmp_path / "store")
    rows = [*conversations(3), "{not json", {"messages": [{"role": "robot", "content": "beep"}]},
            {"messages": [{"role": "user", "content": "only a question"}]}, {"text": "no messages"}]
    ref = files.add(write_jsonl(tmp_path / "train.jsonl", rows))

    with pytest.raises(FinetuneError) as caught:
        train_lora(finetune_task([ref], **TRAIN), FakeReport(files), config=runner_config("unused", tmp_path))

    message = str(caught.value)
    assert message.startswith("bad training data: train.jsonl line 4:")
    assert "line 5: message 0 has role 'robot'" in message
    assert "line 6: no assistant message" in message
    assert 'line 7: no "messages" list' in message
    assert children() == []
    assert list(Path(tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize(("params", "named"), [({"max_steps": "forever"}, "max_steps"),
                                             ({"learning_rate": "fast"}, "learning_rate"),
                                             ({"lora_r": 0}, "lora_r"), ({"num_epochs": [1]}, "num_epochs")])
def test_a_param_that_cannot_be_used_fails_the_task_without_a_retry(tmp_path, params, named):
    files = FakeFiles(tmp_path / "store")
    ref = files.add(write_jsonl(tmp_path / "train.jsonl", conversations(3)))

    with pytest.raises(BadTaskInput, match=f"param '{named}'"):
        train_lora(finetune_task([ref], **params), FakeReport(files), config=runner_config("unused", tmp_path))
    assert children() == []


@pytest.mark.parametrize("refs", [[], "train.jsonl", [7]])
def test_files_that_are_not_a_list_of_refs_fail_the_task_without_a_retry(tmp_path, refs):
    task = Task(id=7, session_id=7, interaction_id=7, mode="finetune", type="text", model_name="tiny", attempt=1,
                input={"files": refs})

    with pytest.raises(BadTaskInput, match="files"):
        train_lora(task, FakeReport(), config=runner_config("unused", tmp_path))


@pytest.mark.slow
def test_failed_training_surfaces_the_end_of_axolotls_log(tiny_mistral, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_mistral, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    files = FakeFiles(tmp_path / "store")
    ref = files.add(write_jsonl(tmp_path / "train.jsonl", conversations()))

    with pytest.raises(FinetuneError) as caught:
        train_lora(finetune_task([ref], **TRAIN), FakeReport(files), config=runner_config(broken, tmp_path),
                   settings=SETTINGS)

    message = str(caught.value)
    headline, _, tail = message.partition("\n")
    assert headline.startswith("axolotl training failed (exit status 1): ")
    assert "SafetensorError" in headline  # the exception that ended axolotl, from its log
    assert tail.startswith("last lines of its log:\n")
    assert "Traceback" in tail or "File " in tail
    assert children() == []


def test_progress_reader_waits_for_whole_lines(tmp_path):
    path = tmp_path / "progress.jsonl"
    reader = ProgressReader(path)
    assert reader.read() == []  # not written yet

    path.write_text('{"event": "step", "step": 1}\n{"event": "st')
    assert reader.read() == [{"event": "step", "step": 1}]
    with path.open("a") as handle:
        handle.write('ep", "step": 2}\n')
    assert reader.read() == [{"event": "step", "step": 2}]
    assert reader.read() == []


def test_log_tail_leaves_out_progress_bars(tmp_path):
    log = tmp_path / "axolotl.log"
    log.write_text("loading\n 33%|###  | 1/3 [00:01<00:03,  1.63s/it]\r 67%|#### | 2/3 [00:02<00:01, 1.2s/it]\n"
                   "Traceback (most recent call last):\n  x = f()\n      ^^^\nValueError: boom\n\n")
    assert log_tail(log) == "loading\nTraceback (most recent call last):\n  x = f()\nValueError: boom"


def test_config_is_qlora_on_a_gpu_with_bitsandbytes_and_plain_lora_on_cpu(tmp_path):
    params = TrainingParams.from_params({"max_steps": 200, "learning_rate": 1e-4, "lora_r": 32})
    gpu = axolotl_config("mistralai/Mistral-7B-Instruct-v0.1", tmp_path / "d.jsonl", tmp_path, params,
                         TrainingSettings(), device="cuda", quantized=True)
    cpu = axolotl_config("tiny", tmp_path / "d.jsonl", tmp_path, TrainingParams.from_params({}), TrainingSettings(),
                         device="cpu", quantized=False)

    assert (gpu["adapter"], gpu["load_in_4bit"], gpu["bf16"]) == ("qlora", True, "auto")
    assert (gpu["max_steps"], gpu["learning_rate"], gpu["lora_r"], gpu["lora_alpha"]) == (200, 1e-4, 32, 32)
    assert "lora_mlp_kernel" not in gpu
    assert (cpu["adapter"], cpu["bf16"], cpu["fp16"], cpu["lora_qkv_kernel"]) == ("lora", False, False, False)
    assert "load_in_4bit" not in cpu and "max_steps" not in cpu and cpu["num_epochs"] == 3
    assert cpu["plugins"] == ["runner.backends.axolotl_progress.ProgressPlugin"]


@pytest.mark.slow
def test_training_exits_when_its_runner_is_killed(tmp_path):
    """A stand-in for a runner (a shell) starts a process watching it as the plugin does, then dies."""
    child = ("import os, time; from runner.backends.axolotl_progress import exit_with_parent; "
             "exit_with_parent(int(os.environ['HELIX_PARENT_PID']), interval=0.1); print('watching', flush=True); "
             "time.sleep(300)")
    shell = subprocess.Popen(["sh", "-c", f'HELIX_PARENT_PID=$$ "{sys.executable}" -c "{child}" & echo $!; wait'],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[3])
    pid = int(shell.stdout.readline())
    assert shell.stdout.readline().strip() == "watching"

    shell.send_signal(signal.SIGKILL)
    shell.wait(timeout=10)

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    deadline = time.monotonic() + 30
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone()
