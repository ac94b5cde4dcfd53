"""`--max-parallel auto`: how many sequences fit in the memory left once the weights are loaded.

One sequence at the model's full context length needs a KV cache of
    2 (K and V) x layers x kv_heads x head_dim x context_len x dtype bytes,
and the slots are max(1, floor(free x headroom / that)), capped (see notes.md, "Slots").
"""

from __future__ import annotations

import logging
import math
from typing import Any

from runner.hardware import HardwareReader

logger = logging.getLogger(__name__)

# Of the memory measured free after loading, the share the KV caches may take: the rest is for
# activations, the allocator's fragmentation and whatever else shares the device.
DEFAULT_HEADROOM = 0.9
# The most slots `auto` gives: the API hands one claim at most 64 tasks (schemas.worker.MAX_CLAIM).
DEFAULT_CAP = 64


def kv_bytes_per_sequence(model_config: Any, dtype_bytes: int, context_len: int | None = None) -> int:
    """KV-cache bytes one sequence needs at `context_len` (default: the model's max_position_embeddings)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)  # grouped-query attention shares K/V
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    context = int(context_len or cfg.max_position_embeddings)
    return 2 * layers * kv_heads * head_dim * context * dtype_bytes


def auto_slots(free_bytes: int, per_sequence: int, *, headroom: float = DEFAULT_HEADROOM,
               cap: int = DEFAULT_CAP) -> int:
    """max(1, floor(free x headroom / per_sequence)), at most `cap`."""
    if per_sequence <= 0:
        return 1
    return max(1, min(cap, math.floor(free_bytes * headroom / per_sequence)))


def free_memory(device: str, reader: HardwareReader | None = None) -> int:
    """Bytes free for the KV caches now: on CUDA what the devices have free, on CPU the RAM available."""
    if device.startswith("cuda"):
        import torch

        # torch sees the devices CUDA_VISIBLE_DEVICES lets it; a model spread over several spreads its cache too.
        return sum(torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count()))
    return (reader or HardwareReader()).ram()[1]


def slots_for_model(model: Any, device: str, *, headroom: float = DEFAULT_HEADROOM, cap: int = DEFAULT_CAP,
                    reader: HardwareReader | None = None) -> int:
    """The slots a loaded transformers model gets from the memory left beside it."""
    dtype_bytes = int(getattr(model.dtype, "itemsize", 4))
    per_sequence = kv_bytes_per_sequence(model.config, dtype_bytes)
    free = free_memory(device, reader)
    slots = auto_slots(free, per_sequence, headroom=headroom, cap=cap)
    logger.info("--max-parallel auto: %d slot(s) from %.2f GiB free x %.2f headroom / %.1f MiB of KV cache per "
                "sequence (cap %d)", slots, free / 1024**3, headroom, per_sequence / 1024**2, cap)
    return slots
