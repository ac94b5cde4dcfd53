"""Where a model's weights go: device, dtype, per-GPU memory map, CPU offload, 8/4-bit; and whether they fit.

Before anything is loaded, the weights' memory is estimated from the parameter count (read from the
model's config, built on the meta device so no weights are touched) by a rule of thumb: a model needs
about 2.5 GB per billion parameters in fp16 (weights plus the working memory around them), 1.25 in
int8. A model that cannot fit is refused with both figures in the message, rather than dying half-way
in an out-of-memory error.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runner.errors import RunnerError

if TYPE_CHECKING:
    from runner.config import RunnerConfig

logger = logging.getLogger(__name__)

GB_PER_BILLION_AT_16_BITS = 2.5  # weights plus the working memory around them
DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
QUANTIZED_BITS = {"8bit": 8, "4bit": 4}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class PlacementError(RunnerError):
    """The model cannot be placed as configured."""


class ModelTooLarge(PlacementError):
    """The model's weights do not fit in the memory it may use."""


def parse_size(text: str) -> int:
    """Bytes in `20GiB`, `20GB`, `512MiB`, `32G` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise PlacementError(f"not a memory size (like 20GiB, 20GB or 512MiB): {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def gigabytes(size: int) -> str:
    """A byte count for messages: in GB, or in MB/kB when that would read as 0.00 GB."""
    if size >= 10**9:
        return f"{size / 1e9:.2f} GB"
    if size >= 10**6:
        return f"{size / 1e6:.1f} MB"
    return f"{size / 1e3:.1f} kB"


def count_text(parameters: int) -> str:
    """A parameter count as 7.24B, 12.3M or 44192."""
    if parameters >= 10**9:
        return f"{parameters / 1e9:.2f}B"
    if parameters >= 10**6:
        return f"{parameters / 1e6:.1f}M"
    return str(parameters)


def estimate_weights_bytes(parameters: int, bits: int) -> int:
    """About 2.5 GB per billion parameters at 16 bits, scaled by the bits per weight (1.25 GB at 8 bits)."""
    return int(parameters * GB_PER_BILLION_AT_16_BITS * bits / 16)


def count_parameters(model_name: str, **config_kwargs: Any) -> int:
    """The parameter count of a causal LM from its config alone (built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name, **config_kwargs)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Placement:
    """What `from_pretrained` is told, and the memory the weights may use."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "float16" or "bfloat16"
    quantize: str | None = None
    max_memory: dict[int | str, int] = field(default_factory=dict)  # empty: everything on `device`
    available: dict[str, int] = field(default_factory=dict)  # where -> bytes, for the fit check

    @property
    def bits(self) -> int:
        """Bits per weight once loaded."""
        return QUANTIZED_BITS[self.quantize] if self.quantize else DTYPE_BITS[self.dtype]

    @property
    def input_device(self) -> str:
        """Where prompts go: the first GPU, or the CPU."""
        return "cuda:0" if self.device == "cuda" else "cpu"

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `AutoModelForCausalLM.from_pretrained`."""
        import torch

        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        if self.device == "cuda":
            kwargs["device_map"] = "auto"
            if self.max_memory:
                kwargs["max_memory"] = dict(self.max_memory)
        if self.quantize:
            from transformers import BitsAndBytesConfig

            if self.quantize == "8bit":
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"])
        return kwargs

    def check_fits(self, parameters: int, model_name: str) -> int:
        """Raise ModelTooLarge unless the estimated weights fit; the estimate in bytes."""
        needed = estimate_weights_bytes(parameters, self.bits)
        total = sum(self.available.values())
        found = ", ".join(f"{where} {gigabytes(size)}" for where, size in self.available.items()) or "nothing"
        if needed > total:
            raise ModelTooLarge(
                f"{model_name} does not fit: its weights need about {gigabytes(needed)} "
                f"({count_text(parameters)} parameters at {self.bits} bits, ~{GB_PER_BILLION_AT_16_BITS} GB per "
                f"billion at 16 bits) but only {gigabytes(total)} was found ({found}). Give it more memory "
                "(--gpu-memory/--cpu-memory) or load it in 8 or 4 bits on a GPU (--load-in-8bit/--load-in-4bit)."
            )
        logger.info("%s: about %s of weights (%s parameters at %d bits); %s available (%s)", model_name,
                    gigabytes(needed), count_text(parameters), self.bits, gigabytes(total), found)
        return needed


def plan_placement(config: RunnerConfig) -> Placement:
    """Decide device, dtype and memory map from the runner's options and the machine."""
    import torch

    has_cuda = torch.cuda.is_available()
    device = config.device
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device == "cuda" and not has_cuda:
        raise PlacementError("--device cuda, but torch sees no CUDA GPU on this machine")
    if device not in ("cpu", "cuda"):
        raise PlacementError(f"unknown device {device!r}: use cpu, cuda or auto")
    if config.quantize:
        if config.quantize not in QUANTIZED_BITS:
            raise PlacementError(f"unknown quantization {config.quantize!r}: use 8bit or 4bit")
        if device != "cuda":
            raise PlacementError(f"loading in {config.quantize} needs a CUDA GPU (bitsandbytes); this runner "
                                 "has none: drop --load-in-8bit/--load-in-4bit or run it on a GPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise PlacementError(f"loading in {config.quantize} needs bitsandbytes: pip install bitsandbytes")
    dtype = config.dtype
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device == "cuda" else "float32"
    if dtype not in DTYPE_BITS:
        raise PlacementError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto")

    max_memory: dict[int | str, int] = {}
    available: dict[str, int] = {}
    if device == "cuda":
        count = torch.cuda.device_count()
        for index in sorted(config.gpu_memory) or range(count):
            if index >= count:
                raise PlacementError(f"--gpu-memory names GPU {index}, but only {count} GPU(s) are visible")
            free = torch.cuda.mem_get_info(index)[0]
            limit = min(parse_size(config.gpu_memory[index]), free) if index in config.gpu_memory else free
            available[f"GPU {index}"] = limit
            if config.gpu_memory or config.cpu_memory:
                max_memory[index] = parse_size(config.gpu_memory[index]) if index in config.gpu_memory else free
        if config.cpu_memory:
            max_memory["cpu"] = available["CPU (offload)"] = parse_size(config.cpu_memory)
    else:
        free = available_ram()
        available["CPU"] = min(parse_size(config.cpu_memory), free) if config.cpu_memory else free
    return Placement(device=device, dtype=dtype, quantize=config.quantize, max_memory=max_memory,
                     available=available)


def available_ram() -> int:
    """Memory the system can still give this process, in bytes (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
