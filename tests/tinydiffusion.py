"""A tiny, randomly initialised Stable Diffusion pipeline built entirely locally (no hub).

:func:`build_tiny_pipeline` makes a CLIP tokenizer from a hand-made byte-level vocabulary
(no merges), a 2-layer CLIP text encoder of width 32, a two-block UNet (32 and 64
channels) on 8x8 latents, a four-block VAE of 8..16 channels (scale factor 8, as in real
Stable Diffusion) and a DDIM scheduler, then ``save_pretrained``s the pipeline: about
4 MB in 10 files. Its pictures are noise, but they go through every real diffusers code
path, at a few hundredths of a second per step for 64x64 pixels on a CPU. The default
image size is 64x64 (sample size 8 x VAE factor 8). Building is deterministic (torch is
seeded), so the same seed gives the same image in every build.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

MAX_LENGTH = 77  # CLIP's prompt length in tokens
SAMPLE_SIZE = 8  # latent pixels; images default to SAMPLE_SIZE * 8
BUILD_SEED = 0


def _byte_chars() -> list[str]:
    """The character CLIP's byte-level BPE uses for each byte 0..255 (printable bytes stand
    for themselves, the others for 256, 257, ... in order), as in ``bytes_to_unicode``."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 256
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(extra))
            extra += 1
    return chars


def write_tokenizer_files(dest: Path) -> int:
    """Write vocab.json (every byte alone and word-final, plus the two special tokens) and
    a merges.txt without merges into ``dest``; return the vocabulary size."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(tokens)


def build_tiny_pipeline(dest: Path) -> Path:
    """Build the tiny pipeline and save it into ``dest`` (created); return ``dest``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" in the test output

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(BUILD_SEED)
    with tempfile.TemporaryDirectory(prefix="tinyvocab") as vocab:
        vocab_size = write_tokenizer_files(Path(vocab))
        tokenizer = CLIPTokenizer(f"{vocab}/vocab.json", f"{vocab}/merges.txt", model_max_length=MAX_LENGTH)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=32,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(dest))
    return dest


if __name__ == "__main__":  # python tests/tinydiffusion.py DEST
    import sys

    print(build_tiny_pipeline(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd")))
