"""`--max-parallel auto`: the KV cache one sequence needs, and the slots the free memory holds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from runner import hardware
from runner.backends.mistral import MistralBackend
from runner.capacity import auto_slots, kv_bytes_per_sequence
from tests.runner.backends.text_doubles import text_config

GIB = 1024**3
MISTRAL_7B = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                             head_dim=None, max_position_embeddings=32768)
# The tiny model of tests/conftest.py (runner/tiny/mistral.py), in float32 on CPU.
TINY_KV = 2 * 2 * 2 * 8 * 2048 * 4


def test_kv_bytes_per_sequence_is_two_x_layers_x_kv_heads_x_head_dim_x_context_x_dtype():
    # Mistral-7B in bfloat16 at its 32k context: 4 GiB of K and V for one sequence.
    assert kv_bytes_per_sequence(MISTRAL_7B, 2) == 2 * 32 * 8 * 128 * 32768 * 2 == 4 * GIB
    assert kv_bytes_per_sequence(MISTRAL_7B, 2, context_len=4096) == GIB // 2
    no_gqa = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, max_position_embeddings=10)
    assert kv_bytes_per_sequence(no_gqa, 4) == 2 * 2 * 4 * 8 * 10 * 4  # kv_heads = heads, head_dim = hidden / heads


def test_slots_are_the_free_memory_with_headroom_over_one_sequence_capped():
    # An 80 GB H100 with Mistral-7B's 14.5 GB of weights loaded: 65 GiB free.
    assert auto_slots(65 * GIB, 4 * GIB, headroom=0.9, cap=64) == 14
    assert auto_slots(65 * GIB, 4 * GIB, headroom=0.9, cap=8) == 8
    assert auto_slots(1 * GIB, 4 * GIB) == 1  # never fewer than one
    assert auto_slots(0, 0) == 1


@pytest.fixture
def low_ram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """This machine's /proc/meminfo replaced by one with 4 MiB available."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  16000000 kB\nMemAvailable:  4096 kB\n")
    monkeypatch.setattr(hardware, "MEMINFO", meminfo)
    return 4 * 1024 * 1024


@pytest.mark.timeout(120)
def test_auto_on_cpu_sizes_the_tiny_models_batch_from_available_ram(tiny_mistral, low_ram):
    backend = MistralBackend(text_config(tiny_mistral, parallel_auto=True, max_parallel=64))
    assert backend.max_parallel == 1 and backend.sizes_slots  # unknown until the weights are in memory
    backend.setup()
    assert backend.max_parallel == int(low_ram * 0.9 // TINY_KV) == 7
    assert backend.generator.max_batch == 7


@pytest.mark.timeout(120)
def test_auto_on_cpu_is_capped(tiny_mistral):
    backend = MistralBackend(text_config(tiny_mistral, parallel_auto=True, max_parallel=5))
    backend.setup()  # this machine's RAM holds far more than five 512 KiB caches
    assert backend.max_parallel == 5


def test_auto_in_finetune_mode_is_one(tiny_mistral):
    backend = MistralBackend(text_config(tiny_mistral, mode="finetune", parallel_auto=True, max_parallel=64))
    backend.setup()
    assert backend.max_parallel == 1
