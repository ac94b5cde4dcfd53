"""DPO and reward-model fine-tunes of the tiny Mistral through axolotl on CPU, and scoring with the reward model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runner.backends import preference
from runner.backends.mistral_finetune import TrainingParams, axolotl_config, train_lora
from runner.backends.reward import RewardBackend
from runner.errors import BadTaskInput
from runner.files import unzip_safely
from runner.messages import Task
from tests.doubles import FakeFiles, FakeReport
from tests.runner.backends.test_mistral_finetune import SETTINGS, finetune_task, runner_config, write_jsonl

TRAIN = {"max_steps": 3, "learning_rate": 0.01, "lora_r": 8, "lora_alpha": 16, "seed": 3}


def comparisons(count: int = 8) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": f"{2 * i}. Stay curious!", "rejected": f"{2 * i}."} for i in range(count)]


def _train(tiny_mistral: Path, root: Path, method: str) -> dict[str, Any]:
    files = FakeFiles(root / "store")
    ref = files.add(write_jsonl(root / "pairs.jsonl", comparisons()))
    report = FakeReport(files)
    result = train_lora(finetune_task([ref], method=method, **TRAIN), report, config=runner_config(tiny_mistral, root),
                        settings=SETTINGS)
    return {"result": result, "report": report, "files": files}


@pytest.fixture(scope="module")
def reward_model(tiny_mistral: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One reward-model fine-tune of the tiny model, shared by the tests that use it."""
    return _train(tiny_mistral, tmp_path_factory.mktemp("rm"), preference.REWARD_MODEL)


@pytest.mark.slow  # axolotl in a subprocess: about 20 s a training
def test_dpo_trains_an_adapter_reporting_loss_and_reward_margin(tiny_mistral, tmp_path):
    trained = _train(tiny_mistral, tmp_path, preference.DPO)
    result, report = trained["result"], trained["report"]
    assert result["method"] == "dpo" and result["steps"] == 3
    assert result["text"].startswith(f"Fine-tuned {tiny_mistral} (dpo) for 3 steps")
    steps = [p for p in report.progress_events if p["step"] > 0]
    assert [p["step"] for p in steps] == [1, 2, 3]
    assert all("loss" in p and "reward_margin" in p and "reward_accuracy" in p for p in steps)
    adapter = tmp_path / "adapter"
    unzip_safely(trained["files"].stored[result["adapter_file_id"]]["path"], adapter)
    assert (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # axolotl in a subprocess: about 20 s a training
def test_a_reward_model_adapter_scores_candidates_with_its_trained_head(reward_model, tiny_mistral, tmp_path):
    result, files = reward_model["result"], reward_model["files"]
    assert result["method"] == "reward_model"
    assert all("reward_accuracy" in p for p in reward_model["report"].progress_events if p["step"] > 0)
    ref = {k: v for k, v in files.stored[result["adapter_file_id"]].items() if k != "path"}
    config = runner_config(tiny_mistral, tmp_path)
    backend = RewardBackend(config)
    backend.setup()
    task = Task(id=9, session_id=9, interaction_id=9, mode="score", type="text", model_name="tiny", attempt=1,
                input={"prompt": "What is 3 plus 3?", "candidates": ["6. Stay curious!", "6.", "6. Stay curious!"],
                       "adapter": ref}, params={}, adapter=ref)
    report = FakeReport(files)
    scored = backend.predict(task, report)
    first, second, third = scored["scores"]
    assert first == pytest.approx(third) and first != second  # a function of the reply, and not a constant
    assert [p["step"] for p in report.progress_events] == [1, 2, 3]
    # The same adapter stays applied; without the adapter's head the scores would differ.
    assert backend.predict(task, FakeReport(files))["scores"] == scored["scores"]


@pytest.mark.slow  # axolotl in a subprocess: about 20 s a training
def test_a_score_task_without_candidates_or_adapter_fails_without_retry(reward_model, tiny_mistral, tmp_path):
    backend = RewardBackend(runner_config(tiny_mistral, tmp_path))
    backend.setup()
    for task_input, adapter in (({"prompt": "p", "candidates": []}, {"id": 1}),
                                ({"prompt": "p", "candidates": ["a"]}, None)):
        task = Task(id=9, session_id=9, interaction_id=9, mode="score", type="text", model_name="tiny", attempt=1,
                    input=task_input, params={}, adapter=adapter)
        with pytest.raises(BadTaskInput):
            backend.predict(task, FakeReport())


def test_bad_comparisons_are_named_before_anything_runs(tmp_path):
    files = FakeFiles(tmp_path / "store")
    rows = [*comparisons(2), {"messages": [{"role": "user", "content": "q"}], "chosen": "a"}, "[1]",
            {"messages": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"}]
    ref = files.add(write_jsonl(tmp_path / "pairs.jsonl", rows))
    with pytest.raises(BadTaskInput) as caught:
        train_lora(finetune_task([ref], method="dpo", **TRAIN), FakeReport(files),
                   config=runner_config("unused", tmp_path))
    message = str(caught.value)
    assert 'pairs.jsonl line 3: no "rejected" reply' in message and "line 4: not a JSON object" in message
    assert "line 5: the messages must end with the user's turn" in message
    with pytest.raises(BadTaskInput, match="params.method"):
        train_lora(finetune_task([ref], method="ppo", **TRAIN), FakeReport(files),
                   config=runner_config("unused", tmp_path))


def test_configs_for_each_method(tmp_path):
    base = axolotl_config("tiny", tmp_path / "d.jsonl", tmp_path, TrainingParams.from_params({}), SETTINGS,
                          device="cpu", quantized=False)
    assert preference.preference_config(base, "sft", {}) is base
    dpo = preference.preference_config(base, "dpo", {"beta": 0.3})
    assert dpo["rl"] == "dpo" and dpo["rl_beta"] == 0.3
    assert dpo["datasets"] == [{"path": str(tmp_path / "d.jsonl"), "ds_type": "json", "field_messages": "messages",
                                "type": "chat_template.default", "field_chosen": "chosen",
                                "field_rejected": "rejected"}]
    rm = preference.preference_config(base, "reward_model", {})
    assert rm["reward_model"] is True and rm["num_labels"] == 1 and rm["pad_to_sequence_len"] is False
    assert rm["datasets"][0]["type"] == "bradley_terry.chat_template"
    assert "rl" not in rm and base["datasets"][0]["type"] == "chat_template"  # the SFT config is left alone


def test_a_reward_model_reads_each_comparison_as_one_bradley_terry_turn():
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                          {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
             "chosen": "c", "rejected": "r"}]
    assert preference.training_rows("reward_model", rows) == [
        {"system": "S", "input": "user: u1\n\nassistant: a1\n\nu2", "chosen": "c", "rejected": "r"}]
    assert preference.training_rows("dpo", rows) is rows
