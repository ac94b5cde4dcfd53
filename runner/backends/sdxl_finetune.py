"""LoRA fine-tuning of an SDXL UNet with diffusers + peft, on the pipeline the runner already loaded.

A plain loop: captions encoded once with both text encoders, VAE latents once per image, then per step
noise at a random timestep, the UNet's prediction, MSE against the noise (or velocity), AdamW on the LoRA
weights only. The adapter is saved as diffusers LoRA safetensors, which `load_lora_weights` reads back.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.backends import params as param
from runner.errors import BadTaskInput

if TYPE_CHECKING:
    from runner.config import RunnerConfig
    from runner.messages import Task
    from runner.reporter import Report

logger = logging.getLogger(__name__)

DEFAULT_MAX_STEPS = 500
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_LORA_R = 8
TRAIN_ADAPTER = "helix-train"
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as diffusers' own scripts


def load_examples(task: Task, report: Report) -> list[tuple[Path, str]]:
    """(image path, caption) per training image, fetched through the runner's file API."""
    from PIL import Image, UnidentifiedImageError

    refs = task.input.get("files")
    captions = task.input.get("captions") or {}
    if not refs or not isinstance(refs, list) or not all(isinstance(ref, dict) and "id" in ref for ref in refs):
        raise BadTaskInput("input.files: an image fine-tune needs a list of training images")
    if not isinstance(captions, dict):
        raise BadTaskInput("input.captions: not an object of image name -> caption")
    examples = []
    for ref in refs:
        report.check()
        name = str(ref.get("name", ""))
        caption = captions.get(name, captions.get(Path(name).name, ""))
        if not caption:
            logger.warning("task %s: image %s has no caption; training it with an empty one", task.id, name)
        path = report.files.fetch(ref)
        try:
            with Image.open(path):
                pass  # the header alone says whether PIL can read it, before any training starts
        except UnidentifiedImageError as exc:
            raise BadTaskInput(f"input.files: {name or ref['id']} is not an image PIL can read") from exc
        examples.append((path, str(caption)))
    return examples


def image_tensor(path: Path, resolution: int) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """The image resized (shorter side) and centre-cropped to a square, in [-1, 1]; its original size and crop."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        original = (img.height, img.width)
        scale = resolution / min(img.width, img.height)
        size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
        top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1), original, (top, left)


def train_lora(task: Task, report: Report, *, pipeline: Any, config: RunnerConfig) -> dict[str, Any]:
    """Train a LoRA on `pipeline`'s UNet for a finetune task, upload it, and leave the UNet as it was."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    params = task.params
    pipe, unet = pipeline, pipeline.unet
    device, dtype = unet.device, unet.dtype
    max_steps = param.integer(params, "max_steps", DEFAULT_MAX_STEPS, low=1)
    learning_rate = param.number(params, "learning_rate", DEFAULT_LEARNING_RATE, above=0)
    rank = param.integer(params, "lora_r", DEFAULT_LORA_R, low=1)
    native = pipe.default_sample_size * pipe.vae_scale_factor
    resolution = param.integer(params, "resolution", native, low=8, multiple=8)
    seed = param.integer(params, "seed", 0, low=0)
    generator = torch.Generator("cpu").manual_seed(seed)

    examples = load_examples(task, report)
    report.log(f"training a LoRA (r={rank}) on {len(examples)} images at {resolution}px for {max_steps} steps")
    started = time.monotonic()
    with torch.no_grad():
        prepared = [_prepare(pipe, path, caption, resolution, generator) for path, caption in examples]
    report.check()

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=TARGET_MODULES), adapter_name=TRAIN_ADAPTER)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # LoRA weights train in float32 whatever the base weights are in
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    checkpointing = device.type == "cuda"
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    Path(config.work_path).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"helix-lora-{task.id}-", dir=config.work_path))
    loss_value = math.nan
    try:
        order: list[int] = []
        for step in range(1, max_steps + 1):
            if not order:
                order = torch.randperm(len(prepared), generator=generator).tolist()
            latents, embeds, pooled, time_ids = prepared[order.pop()]
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator)
            timesteps = timesteps.to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=embeds,
                                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            # Raises TaskCancelled once cancelled: the finally below puts the UNet back either way.
            report.progress(step, max_steps, message="training", loss=round(loss_value, 6))
        adapter_dir = work / "adapter"
        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=TRAIN_ADAPTER))
        StableDiffusionXLPipeline.save_lora_weights(adapter_dir, unet_lora_layers=lora, safe_serialization=True)
        (adapter_dir / "helix_adapter.json").write_text(json.dumps({
            "base_model": task.model_name, "kind": "sdxl-unet-lora", "lora_r": rank, "lora_alpha": rank,
            "target_modules": TARGET_MODULES, "resolution": resolution, "steps": max_steps,
            "learning_rate": learning_rate, "images": len(prepared), "loss": loss_value,
        }, indent=2))
        ref = report.files.upload_dir(adapter_dir, kind="adapter")
    finally:
        if checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()
        unet.unload_lora()  # the bare base weights again, for whatever task comes next
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    logger.info("task %s: LoRA trained in %.1fs, %d steps, loss %.4f", task.id, elapsed, max_steps, loss_value)
    return {
        "text": f"Trained a LoRA (r={rank}) on {len(prepared)} images for {max_steps} steps; "
                f"final loss {loss_value:.4f}.",
        "adapter_file_id": ref["id"],
        "steps": max_steps,
        "loss": loss_value,
    }


def _prepare(pipe: Any, path: Path, caption: str, resolution: int, generator: Any) -> tuple[Any, ...]:
    """One example as the UNet sees it: VAE latents, both encoders' caption embeddings, SDXL's time ids."""
    import torch

    device, dtype = pipe.unet.device, pipe.unet.dtype
    pixels, original, crop = image_tensor(path, resolution)
    vae = pipe.vae
    # SDXL's own VAE overflows in float16; its config says so (force_upcast), as the pipeline honours too.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    vae_dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        dist = vae.encode(pixels.unsqueeze(0).to(device, vae_dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(device, vae_dtype)
        latents = (dist.mean + dist.std * noise) * vae.config.scaling_factor
    finally:
        if upcast:
            vae.to(torch.float16)
    embeds, _, pooled, _ = pipe.encode_prompt(caption, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    time_ids = torch.tensor([[*original, *crop, resolution, resolution]], device=device, dtype=dtype)
    return latents.to(dtype), embeds.to(dtype), pooled.to(dtype), time_ids

