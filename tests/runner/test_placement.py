"""Placement: memory sizes, the weights estimate, and refusing a model that cannot fit before any claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runner.config import RunnerConfig
from runner.placement import (
    ModelTooLarge,
    Placement,
    PlacementError,
    count_parameters,
    estimate_weights_bytes,
    gigabytes,
    parse_size,
    plan_placement,
)

ROOT = Path(__file__).resolve().parents[2]


def config(**overrides) -> RunnerConfig:
    return RunnerConfig(api_url="http://helix.test", token="hxr_test", mode="create", type="text",
                        model_name="m", **overrides)


def test_sizes_read_as_bytes():
    assert parse_size("20GiB") == 20 * 2**30
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5G") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096
    with pytest.raises(PlacementError, match="not a memory size"):
        parse_size("lots")


def test_estimate_allows_2_5_gb_per_billion_parameters_at_16_bits_scaled_by_bits():
    seven_billion = 7_000_000_000
    assert estimate_weights_bytes(seven_billion, 16) == 17_500_000_000  # 2.5 GB per billion at 16 bits
    assert estimate_weights_bytes(seven_billion, 8) == 8_750_000_000  # 1.25 at 8 bits
    assert estimate_weights_bytes(seven_billion, 4) == 4_375_000_000


def test_parameters_are_counted_from_the_config_alone(tiny_mistral):
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_mistral).parameters())
    assert count_parameters(str(tiny_mistral)) == real


def test_a_model_that_cannot_fit_is_refused_naming_both_figures():
    placement = Placement(device="cuda", dtype="float16", available={"GPU 0": 8 * 10**9})
    with pytest.raises(ModelTooLarge) as caught:
        placement.check_fits(7_000_000_000, "mistralai/Mistral-7B-Instruct-v0.1")
    message = str(caught.value)
    assert "17.50 GB" in message and "8.00 GB" in message and "GPU 0" in message
    # In 8 bits the same model fits.
    assert Placement(device="cuda", dtype="float16", quantize="8bit",
                     available={"GPU 0": 9 * 10**9}).check_fits(7_000_000_000, "m") == 8_750_000_000


def test_cpu_memory_limit_is_what_a_cpu_runner_may_use():
    placement = plan_placement(config(device="cpu", cpu_memory="10KB"))
    assert placement.device == "cpu" and placement.dtype == "float32"
    assert placement.available == {"CPU": 10_000}


def test_quantizing_without_a_gpu_is_a_clear_error():
    with pytest.raises(PlacementError, match="needs a CUDA GPU"):
        plan_placement(config(device="cpu", quantize="8bit"))


def test_asking_for_cuda_without_one_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(PlacementError, match="no CUDA GPU"):
        plan_placement(config(device="cuda"))


def test_runner_exits_at_start_up_with_both_figures_before_claiming(tiny_mistral):
    # Nothing listens on port 9: a claim would fail differently (and slowly); the refusal comes first.
    env = {"HELIX_GET_JOB_URL": f"http://127.0.0.1:9/api/v1/worker/task?mode=create&type=text&model_name={tiny_mistral}",
           "HELIX_RUNNER_TOKEN": "hxr_test", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "runner", "--backend", "mistral", "--device", "cpu",
                           "--cpu-memory", "10KB"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    parameters = count_parameters(str(tiny_mistral))
    assert f"need about {gigabytes(estimate_weights_bytes(parameters, 32))}" in done.stderr
    assert f"only {gigabytes(10_000)} was found (CPU {gigabytes(10_000)})" in done.stderr
    assert "claiming" not in done.stderr
    assert "Traceback" not in done.stderr
