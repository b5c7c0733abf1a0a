"""The named tiny models: ``tiny-random`` (RANDOM weights) and ``tiny-demo`` (learned, shipped).

`build_tiny_model` writes a real diffusers pipeline folder (UNet, VAE, CLIP text
encoder(s), a small CLIP tokenizer written from a hand-made vocabulary) that
loads through the same ``from_pretrained`` path as real models.  Its weights
are random: labels made with it are meaningless and only exercise the code.

``resolve_model("tiny-random")`` builds it once into a cache folder
(``$DIFFSEG_CACHE/tiny-random`` or ``~/.cache/diffseg/tiny-random``); parallel
workers build into private temporary folders and publish with an atomic
rename, so they never see a half-written model.

``resolve_model("tiny-demo")`` is the folder shipped inside the package
(``diffseg_core/demo_model/tiny-demo``): a small SD-shaped model whose VAE and
UNet were trained for minutes on synthetic scenes by
``python -m diffseg_core.demo_model.train``. It is a demo, not Stable Diffusion.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from diffseg_core.load_logging import quiet_loading
from diffseg_core.model_error import ModelLoadError
from diffseg_core.weight_hashes import diffseg_cache_dir

__all__ = [
    "TINY_DEMO", "TINY_RANDOM", "build_tiny_model", "resolve_model", "save_sd1_pipeline", "tiny_demo_path",
    "tiny_text_encoder", "tiny_model_cache_dir", "tiny_random_path",
]

logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
TINY_DEMO = "tiny-demo"
_MAX_LENGTH = 77  # CLIP's model_max_length, as in real SD tokenizers


def tiny_model_cache_dir() -> Path:
    return diffseg_cache_dir() / TINY_RANDOM


def tiny_random_path() -> Path:
    """Where ``resolve_model("tiny-random")`` keeps the built model (it may not exist yet).

    The folder is named by a fingerprint of the builder's own source, so a
    change to the tiny configs builds a new model instead of reusing a stale one.
    """
    return tiny_model_cache_dir() / f"sd1-{_builder_fingerprint()}"


@functools.lru_cache(maxsize=1)
def _builder_fingerprint() -> str:
    source = "".join(inspect.getsource(f) for f in (build_tiny_model, _scheduler, _text_config, _write_tokenizer_source))
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def tiny_demo_path() -> Path:
    """The shipped tiny-demo diffusers folder (package data)."""
    return Path(__file__).resolve().parent / "demo_model" / TINY_DEMO


def resolve_model(name: str) -> str:
    """Map ``"tiny-random"`` / ``"tiny-demo"`` to their folders; return anything else unchanged."""
    if str(name) == TINY_DEMO:
        target = tiny_demo_path()
        if not (target / "model_index.json").is_file():
            raise ModelLoadError(TINY_DEMO, f"its weights are missing from this installation ({target}); "
                                 "rebuild them with: python -m diffseg_core.demo_model.train")
        return str(target)
    if str(name) != TINY_RANDOM:
        return name
    target = tiny_random_path()
    if not (target / "model_index.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        try:
            with quiet_loading():
                build_tiny_model(tmp, variant="sd1", seed=0)
            try:
                os.rename(tmp, target)  # atomic; fails if another worker published first
            except OSError:
                if not (target / "model_index.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("model 'tiny-random' has RANDOM weights: its labels are meaningless (%s)", target)
    return str(target)


def build_tiny_model(path: str | os.PathLike, variant: str = "sd1", seed: int = 0) -> Path:
    """Build and save a tiny SD-shaped diffusers folder with RANDOM weights; return its path.

    ``variant="sd1"``: SD 1.x layout (one CLIP text encoder, cross-attention in
    the down/up blocks and the mid block; at the native 128 px, latents are
    16 x 16 and self-attention runs at 16, 8 and 4).  ``variant="sdxl"``: SDXL
    layout (two text encoders, the second with projection; ``text_time`` added
    conditioning; linear projections; no attention in the first down block and
    the last up block, so self-attention runs at 8 and 4).  Native image size
    is 128 px for both, so DiffSeg's default 16 x 16 anchor grid fits the
    16 x 16 SD1-shaped maps.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if variant not in ("sd1", "sdxl"):
        raise ValueError(f"variant must be 'sd1' or 'sdxl', not {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    text_dim = 32
    if variant == "sd1":
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_dim,
            attention_head_dim=2,  # SD1 semantics: number of heads
            norm_num_groups=16,
        )
    else:
        time_dim = 8
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 1),
            cross_attention_dim=2 * text_dim,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + text_dim,
            norm_num_groups=16,
        )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),  # 4 blocks: downsampling by 8, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=0.18215 if variant == "sd1" else 0.13025,
    )
    text_config = _text_config(path / ".tokenizer-src", text_dim)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    tokenizer = CLIPTokenizer.from_pretrained(path / ".tokenizer-src")
    readme = (f"Tiny {variant.upper()}-shaped diffusers model with RANDOM weights (seed {seed}), built by "
              "diffseg_core.tiny_model.build_tiny_model for tests. Its outputs are meaningless.\n")
    if variant == "sd1":
        save_sd1_pipeline(path, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, readme=readme)
        return path
    from diffusers import StableDiffusionXLPipeline

    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    tokenizer_2 = CLIPTokenizer.from_pretrained(path / ".tokenizer-src", pad_token="!")  # as SDXL's tokenizer_2
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    shutil.rmtree(path / ".tokenizer-src", ignore_errors=True)
    (path / "README.md").write_text(readme)
    return path


def tiny_text_encoder(text_dim: int = 32):
    """A tiny CLIP text encoder (initialised from torch's current RNG) and its tokenizer."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        config = _text_config(Path(tmp), text_dim)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    return CLIPTextModel(CLIPTextConfig(**config)), tokenizer


def save_sd1_pipeline(path: str | os.PathLike, *, unet, vae, text_encoder, tokenizer, readme: str) -> Path:
    """Save an SD 1.x-layout diffusers folder (``StableDiffusionPipeline``, safetensors) with a README."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    shutil.rmtree(path / ".tokenizer-src", ignore_errors=True)
    (path / "README.md").write_text(readme)
    return path


def _scheduler():
    """SD 1.4's scheduler config; unused by DiffSeg, kept for a complete pipeline."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )


def _text_config(tokenizer_folder: Path, text_dim: int) -> dict:
    """Write the tokenizer source files into ``tokenizer_folder``; return a tiny CLIPTextConfig's fields."""
    return dict(
        vocab_size=_write_tokenizer_source(tokenizer_folder),
        hidden_size=text_dim,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        projection_dim=text_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _write_tokenizer_source(folder: Path) -> int:
    """Write a small CLIP BPE vocabulary (vocab.json, merges.txt); return the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "!</w>": 3}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = ["#version: 0.2", "c a", "ca t</w>", "d o", "do g</w>"]
    for token in ("ca", "cat</w>", "do", "dog</w>"):
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": _MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }))
    return len(vocab)
