"""SDXL with diffusers: the pipeline loaded once; predict() makes images, train() fine-tunes a LoRA on it.

setup() loads the StableDiffusionXLPipeline (by hub id or local path) onto the configured device, after
checking it fits. predict() makes a `create` task's images, with the session's LoRA adapter loaded onto
the pipeline for that task only, and reports each denoising step. train() trains a LoRA on the UNet for
a `finetune` task (runner.backends.sdxl_finetune) and leaves the UNet bare again. Both use the one
pipeline, so the backend holds one task at a time.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.backends import params as param
from runner.backends.base import Backend
from runner.errors import BadTaskInput
from runner.messages import FINETUNE
from runner.placement import PlacementError, plan_placement
from runner.tiny.sdxl import MARKER as TINY_MARKER

if TYPE_CHECKING:
    from runner.config import RunnerConfig
    from runner.messages import Task
    from runner.reporter import Report

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 30
# The tiny random-weight pipeline (runner.tiny.sdxl) draws noise whatever the steps: a few show every step
# at work without the minutes 30 take on a CPU.
TINY_DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 5.0
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
ADAPTER_NAME = "helix"


class PipelineLoadError(PlacementError):
    """The pipeline cannot be loaded: the runner must not claim work."""


def safetensors_params(path: Path) -> int:
    """The number of parameters in a .safetensors file, read from its header alone."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")


def local_params(model_dir: Path) -> int | None:
    """Parameters of a pipeline saved on disk, or None when its weights are not all safetensors."""
    total = 0
    for component in COMPONENTS:
        folder = model_dir / component
        if not folder.is_dir():
            continue
        files = sorted(folder.glob("*.safetensors"))
        plain = [f for f in files if len(f.name.split(".")) == 2]  # without a variant such as .fp16.
        chosen = plain or [f for f in files if ".fp16." in f.name]
        if not chosen:
            return None
        total += sum(safetensors_params(f) for f in chosen)
    return total or None


def pipeline_params(pipe: Any) -> int:
    """Parameters of the pipeline's models, as loaded."""
    return sum(p.numel() for name in COMPONENTS if (m := getattr(pipe, name, None)) is not None
               for p in m.parameters())


# The backend.


class SDXLBackend(Backend):
    """A StableDiffusionXLPipeline loaded once: predict() makes images, train() trains a LoRA on the UNet."""

    max_parallel = 1  # one pipeline, and adapters are loaded onto it per task

    def __init__(self, config: RunnerConfig) -> None:
        super().__init__(config)
        self.pipe: Any = None
        self.device = "cpu"
        self.dtype = "float32"
        self._lock = threading.Lock()  # guards the pipeline should a caller ever ignore max_parallel
        self.default_steps = DEFAULT_STEPS  # when a task names no num_inference_steps

    # Loading.

    def setup(self) -> None:
        """Load the pipeline named by `config.model_name` (a hub id or a path) onto the configured device.

        Raises a PlacementError (before any work is claimed) when it cannot load or would not fit.
        """
        import torch
        from diffusers import StableDiffusionXLPipeline

        model = self.config.model_name
        if not model:
            raise PipelineLoadError("no model_name: give the SDXL pipeline's hub id or path")
        if self.config.quantize:
            raise PipelineLoadError("the sdxl backend does not quantize: drop --load-in-8bit/--load-in-4bit")
        placement = plan_placement(self.config)
        self.device, self.dtype = placement.input_device, placement.dtype
        counted = local_params(Path(model)) if Path(model).is_dir() else None
        if counted:
            placement.check_fits(counted, model)  # before reading gigabytes
        started = time.monotonic()
        try:
            pipe = self._from_pretrained(StableDiffusionXLPipeline, model, getattr(torch, self.dtype))
        except Exception as exc:
            raise PipelineLoadError(f"cannot load SDXL pipeline {model!r}: {exc}") from exc
        if self.device != "cpu":
            if not counted:
                placement.check_fits(pipeline_params(pipe), model)  # a hub id: counted on the CPU first
            try:
                pipe.to(self.device)
            except torch.cuda.OutOfMemoryError as exc:
                raise PipelineLoadError(f"{model} does not fit on {self.device}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        if (Path(model) / TINY_MARKER).is_file():
            self.default_steps = TINY_DEFAULT_STEPS
        logger.info("loaded %s on %s in %s in %.1fs", model, self.device, self.dtype, time.monotonic() - started)

    def generate(self, **kwargs: Any) -> list[Any]:
        """The bare pipeline call: PIL images."""
        import torch

        with torch.inference_mode():
            return self.pipe(**kwargs).images

    def _from_pretrained(self, cls: Any, model: str, torch_dtype: Any) -> Any:
        if self.dtype in ("float16", "bfloat16"):
            try:  # half the download when the repo has fp16 weights (cast to bfloat16 as they load)
                return cls.from_pretrained(model, torch_dtype=torch_dtype, variant="fp16", use_safetensors=True)
            except (OSError, ValueError) as exc:
                logger.info("%s: no fp16 variant (%s); loading the full weights", model, exc)
        return cls.from_pretrained(model, torch_dtype=torch_dtype)

    # Tasks.

    def predict(self, task: Task, report: Report) -> dict[str, Any]:
        """Make the images of a `create` task and upload them as PNGs."""
        if task.mode != "create":
            raise BadTaskInput(f"task {task.id}: predict() makes images for create tasks, not {task.mode!r}")
        if self.pipe is None:
            raise RuntimeError("predict() called before setup()")
        with self._lock:
            return self._create(task, report)

    def train(self, task: Task, report: Report) -> dict[str, Any]:
        """Train a LoRA on the pipeline's UNet for a `finetune` task; the UNet is bare again afterwards."""
        if task.mode != FINETUNE:
            raise BadTaskInput(f"task {task.id}: train() takes finetune tasks, not {task.mode!r}")
        if self.pipe is None:
            raise RuntimeError("train() called before setup()")
        from runner.backends.sdxl_finetune import train_lora

        with self._lock:
            return train_lora(task, report, pipeline=self.pipe, config=self.config)

    def _create(self, task: Task, report: Report) -> dict[str, Any]:
        import torch

        pipe, params = self.pipe, task.params
        prompt = prompt_of(task)
        native = pipe.default_sample_size * pipe.vae_scale_factor
        # diffusers refuses sides that are not a multiple of 8 (the VAE's downscaling).
        width = param.integer(params, "width", native, low=8, multiple=8)
        height = param.integer(params, "height", native, low=8, multiple=8)
        steps = param.integer(params, "num_inference_steps", self.default_steps, low=1)
        count = param.integer(params, "num_images", 1, low=1)
        guidance = param.number(params, "guidance_scale", DEFAULT_GUIDANCE, low=0)
        negative_prompt = param.text(params, "negative_prompt")
        seed = param.integer(params, "seed", secrets.randbelow(2**31), low=0)
        report.check()
        # One CPU generator per image: image i starts from the noise a single-image task with seed + i starts
        # from, on any device (batched arithmetic may still round its pixels a little differently).
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # progress() raises TaskCancelled once the task must stop; it leaves the pipeline call from here.
            report.progress(step + 1, pipeline.num_timesteps, message="denoising")
            return tensors

        with LoadedAdapter(pipe, task, report):
            images = self.generate(
                prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                num_images_per_prompt=count, callback_on_step_end=on_step_end,
            )
        report.check()
        ids = []
        out_dir = Path(tempfile.mkdtemp(prefix=f"helix-sdxl-{task.id}-"))
        try:
            for index, image in enumerate(images):
                path = out_dir / f"image-{task.id}-{index + 1}.png"
                image.save(path, format="PNG")
                ref = report.files.upload(path, kind="output", content_type="image/png")
                ids.append(ref["id"])
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        return {"text": "", "files": ids, "width": width, "height": height, "seed": seed}


class LoadedAdapter:
    """Loads the task's LoRA onto the pipeline for the duration of a `with`, and always unloads it."""

    def __init__(self, pipe: Any, task: Task, report: Report) -> None:
        self.pipe, self.task, self.report = pipe, task, report
        self.loaded = False

    def __enter__(self) -> LoadedAdapter:
        ref = self.task.adapter
        if not ref:
            return self
        name = ref.get("name", "adapter")
        weights = adapter_weights_dir(self.report.files.fetch_dir(ref), name)
        # Before loading: __exit__ does not run when __enter__ raises, and log() raises once cancelled.
        self.report.log(f"loading adapter {name}")
        started = time.monotonic()
        try:
            self.pipe.load_lora_weights(str(weights), adapter_name=ADAPTER_NAME)
        except BaseException as exc:
            self.pipe.unload_lora_weights()  # whatever part of it did load must not outlive this task
            if isinstance(exc, ValueError):  # diffusers/peft: LoRA weights that do not match this pipeline
                raise BadTaskInput(f"adapter {name}: cannot be loaded onto this pipeline: {exc}") from exc
            raise
        self.loaded = True
        logger.info("task %s: loaded adapter %s in %.2fs", self.task.id, name, time.monotonic() - started)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.loaded:
            # Removes the LoRA layers altogether: the next task gets the bare base weights back.
            self.pipe.unload_lora_weights()
            logger.info("task %s: unloaded adapter", self.task.id)


def adapter_weights_dir(path: Path, name: str = "adapter") -> Path:
    """The directory holding the LoRA weights: the unpacked one itself, or its single subdirectory."""
    if any(path.glob("*.safetensors")):
        return path
    inner = [p for p in path.iterdir() if p.is_dir()]
    if len(inner) == 1 and any(inner[0].glob("*.safetensors")):
        return inner[0]
    raise BadTaskInput(f"adapter {name}: no LoRA weights (.safetensors) in it")


def prompt_of(task: Task) -> str:
    """The task's prompt, or the last user message when only messages came; BadTaskInput when neither has text."""
    prompt = task.input.get("prompt")
    if not prompt:
        messages = task.input.get("messages")
        messages = messages if isinstance(messages, list) else []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1].get("content") if users else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadTaskInput("input.prompt: an image task needs a prompt (or a user message) with some text")
    return prompt
