"""A tiny StableDiffusionXLPipeline built from configs, offline: about 11 MB, a 64x64 image in well under a second.

The weights are random, so images are noise; what matters is that it is a real SDXL pipeline (two text
encoders, a text_time UNet, a VAE, an Euler scheduler) that loads, generates, reports steps and takes LoRA.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = ".helix-tiny-sdxl"  # written last: a directory without it is a half-built pipeline
RECIPE = 1  # bump when the recipe changes, so old builds are rebuilt
SEED = 0
WORDS = (
    "a an the of and with on in at to by for from photo painting drawing picture image portrait landscape "
    "red green blue yellow orange purple black white gray brown pink gold silver bright dark colorful "
    "cat dog bird fish horse cow fox owl bear lion tiger robot car boat ship train plane house castle tree "
    "flower forest mountain river lake sea ocean beach sky sun moon star stars cloud clouds rain snow city "
    "street road garden field desert island planet space night day sunset sunrise morning evening "
    "big small tiny huge old new happy sad cute beautiful ugly fast slow two three many one "
    "style cinematic photorealistic detailed sharp blurry 8k hd art oil watercolor sketch pixel helix"
).split()


def _tokenizer(max_length: int):
    """A lower-casing WordLevel tokenizer wrapped for transformers, with CLIP's bos/eos/pad layout."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<pad>", "<|endoftext|>", "<unk>"]  # ids 0, 1, 2, 3 as in the configs
    vocab = {token: index for index, token in enumerate([*specials, *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)


def build_pipeline():
    """The tiny pipeline in memory, with fixed random weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + text_encoder_2's projection (32)
        cross_attention_dim=64,  # both encoders' hidden states side by side: 32 + 32
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    torch.manual_seed(SEED)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=128)
    max_length = 77
    encoder_config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32,
                                    intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                                    num_hidden_layers=5, vocab_size=1000, hidden_act="gelu", projection_dim=32,
                                    max_position_embeddings=max_length)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(encoder_config)
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(encoder_config)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_tokenizer(max_length),
        tokenizer_2=_tokenizer(max_length), unet=unet, scheduler=scheduler,
    )


def build_tiny_sdxl(path: str | Path) -> Path:
    """Build the tiny pipeline into `path` with save_pretrained; reuse it when already built there."""
    path = Path(path)
    marker = path / MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("recipe") == RECIPE:
                return path
        except (OSError, ValueError):
            pass
        logger.info("rebuilding the tiny SDXL pipeline in %s (older or unreadable build)", path)
    if path.exists():
        shutil.rmtree(path)
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    build_pipeline().save_pretrained(staging)
    (staging / MARKER).write_text(json.dumps({"recipe": RECIPE}))
    staging.rename(path)  # whole or nothing: a crash leaves no directory that looks built
    logger.info("built the tiny SDXL pipeline in %s", path)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m runner.tiny.sdxl PATH`: build (or reuse) the tiny pipeline there and print the path."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("path", help="directory to build the pipeline in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tiny_sdxl(args.path))


if __name__ == "__main__":
    main()
