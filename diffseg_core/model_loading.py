"""Loading the parts of a Stable Diffusion model that DiffSeg needs.

Only the VAE encoder and the UNet are kept.  The tokenizer(s) and text
encoder(s) are loaded once, on CPU in float32, to encode the empty prompt the
way diffusers' pipelines encode a prompt, and are freed right after.

Sources: a Hugging Face hub id (or its offline cache), a local diffusers folder,
or a single-file checkpoint (``.safetensors``; ``.ckpt`` only with
``allow_unsafe_weights``).  Weights load from safetensors only unless
``allow_unsafe_weights=True``; remote code is never run.
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffseg_core.load_logging import quiet_loading  # noqa: F401 - re-exported (the actors, the driver)
from diffseg_core.model_check import (  # torch-free checks, shared with the driver's model check
    UNSAFE_WEIGHTS_HOW,
    ModelLoadError,
    check_weights,
    folder_weight_files,
    hub_commit,
    looks_like_path,
    read_model_card,
    read_model_index,
    text_parts,
)
from diffseg_core.vocabulary import encode_vocabulary
from diffseg_core.weight_hashes import sha256_files  # noqa: F401 - re-exported (extract.py)

__all__ = ["ModelLoadError", "LoadedModel", "load_model", "quiet_loading", "read_model_card"]

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """The UNet, the VAE (encoder only) and the cached conditioning."""

    unet: Any
    vae: Any
    encoder_hidden_states: torch.Tensor  # (1, L, D), float32, CPU
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids
    is_sdxl: bool = False
    source: str = ""  # "hub", "folder" or "single_file"
    resolved: str = ""  # local path or hub id
    revision: str | None = None
    weight_files: list[str] = field(default_factory=list)
    vocabulary: Any = None  # EncodedVocabulary when load_model was given one
    card: dict[str, Any] = field(default_factory=dict)  # the folder's diffseg.json, if any


def load_model(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_unsafe_weights: bool = False,
    config: str | None = None,
    vocabulary: Any = None,
) -> LoadedModel:
    """Load UNet + VAE encoder and the empty-prompt conditioning, on CPU in float32.

    ``config`` is only used for single-file checkpoints: a local diffusers
    folder (or hub id) with the component configs, needed offline.
    ``vocabulary`` (a `diffseg_core.vocabulary.Vocabulary`) is encoded by the
    text encoder(s) while they are loaded (``LoadedModel.vocabulary``).
    """
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.is_file():
        loaded = _load_single_file(name, path, allow_unsafe_weights, config, vocabulary)
    elif path.is_dir():
        loaded = _load_folder(name, path, allow_unsafe_weights, vocabulary)
    elif looks_like_path(name):
        raise ModelLoadError(name, "no such file or folder.")
    else:
        loaded = _load_hub(name, revision, allow_unsafe_weights, vocabulary)
    return loaded


# ----------------------------------------------------------------------------- sources


def _load_folder(name: str, path: Path, allow_unsafe: bool, vocabulary: Any = None) -> LoadedModel:
    for sub in ("unet", "vae"):
        if not (path / sub).is_dir():
            raise ModelLoadError(name, f"the folder has no '{sub}' subfolder (expected a diffusers model folder).")
        check_weights(name, path / sub, allow_unsafe)
    index = read_model_index(path)
    parts = text_parts(index, lambda sub: (path / sub).is_dir())
    for sub in parts:
        check_weights(name, path / sub, allow_unsafe)
    loaded = _load_components(name, str(path), None, allow_unsafe, parts, vocabulary)
    loaded.source = "folder"
    loaded.resolved = str(path.resolve())
    loaded.weight_files = folder_weight_files(path, parts)
    loaded.card = read_model_card(path)
    return loaded


def _load_hub(name: str, revision: str | None, allow_unsafe: bool, vocabulary: Any = None) -> LoadedModel:
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(name, revision=revision)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not found / unreachable"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "not a local path, and not in the Hugging Face cache" if offline else "not a local path or reachable hub repo"
        raise ModelLoadError(name, f"{why} ({type(exc).__name__}: {_first_line(exc)}).") from exc
    parts = text_parts(index, lambda sub: index.get(sub, [None])[0] is not None)
    loaded = _load_components(name, name, revision, allow_unsafe, parts, vocabulary)
    loaded.source = "hub"
    loaded.resolved = name
    loaded.revision = hub_commit(name, revision) or revision
    return loaded


def _load_single_file(
    name: str, path: Path, allow_unsafe: bool, config: str | None, vocabulary: Any = None
) -> LoadedModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix != ".safetensors" and not allow_unsafe:
        raise ModelLoadError(
            name,
            f"'{path.suffix}' checkpoints are pickle files that can run code; "
            f"convert to .safetensors, or accept that risk: {UNSAFE_WEIGHTS_HOW}.",
        )
    is_sdxl = _single_file_is_sdxl(name, path) if path.suffix == ".safetensors" else False
    cls = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"config": config} if config else {}
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            name,
            f"the single-file checkpoint could not be loaded ({type(exc).__name__}: {_first_line(exc)}); "
            "offline, pass config= a local diffusers folder of the same architecture.",
        ) from exc
    parts = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl:
        parts.append((pipe.tokenizer_2, pipe.text_encoder_2))
    loaded = _finish(pipe.unet, pipe.vae, [p for p in parts if p[1] is not None], vocabulary)
    del pipe
    gc.collect()
    loaded.source = "single_file"
    loaded.resolved = str(path.resolve())
    loaded.weight_files = [str(path)]
    return loaded


# ----------------------------------------------------------------------------- components


def _load_components(
    name: str, where: str, revision: str | None, allow_unsafe: bool, text_parts: list[str], vocabulary: Any = None
) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    safe = True if not allow_unsafe else None  # None: prefer safetensors, accept .bin

    def load(what: str, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(name, f"its {what} could not be loaded ({type(exc).__name__}: {_first_line(exc)}).") from exc

    common: dict[str, Any] = {"revision": revision, "use_safetensors": safe}
    dcommon = dict(common)
    if importlib.util.find_spec("accelerate") is None:
        dcommon["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, minus its warning
    unet = load("'unet'", lambda: UNet2DConditionModel.from_pretrained(where, subfolder="unet", **dcommon))
    vae = load("'vae'", lambda: AutoencoderKL.from_pretrained(where, subfolder="vae", **dcommon))
    parts = []
    for sub in text_parts:
        tok_sub = sub.replace("text_encoder", "tokenizer")
        cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
        tokenizer = load(f"'{tok_sub}'", lambda: CLIPTokenizer.from_pretrained(where, subfolder=tok_sub, revision=revision))
        encoder = load(f"'{sub}'", lambda: cls.from_pretrained(where, subfolder=sub, **common))
        parts.append((tokenizer, encoder))
    return _finish(unet, vae, parts, vocabulary)


def _finish(unet, vae, text_parts: list[tuple[Any, Any]], vocabulary: Any = None) -> LoadedModel:
    """Drop the VAE decoder, encode the empty prompt (and the vocabulary), free the text encoders."""
    vae.decoder = None
    vae.post_quant_conv = None
    is_sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if not text_parts:
        raise ValueError("no text encoder to encode the empty prompt with")
    for _, encoder in text_parts:
        encoder.to("cpu", torch.float32).eval()
    tokenizers = [tokenizer for tokenizer, _ in text_parts]
    empty = [
        tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        for tokenizer in tokenizers
    ]
    with torch.inference_mode():
        hidden, pooled = encode_token_ids(text_parts, empty, is_sdxl)
        hidden = hidden.clone()
        encoded = None
        if vocabulary is not None:
            encoded = encode_vocabulary(
                vocabulary, tokenizers, lambda rows: encode_token_ids(text_parts, rows, is_sdxl)[0]
            )
    added: dict[str, torch.Tensor] = {}
    if is_sdxl:
        if pooled is None:
            raise ValueError("SDXL-family UNet but no projection text encoder (text_encoder_2) for pooled embeddings")
        added["text_embeds"] = pooled.float().clone()
    del text_parts, tokenizers
    gc.collect()
    return LoadedModel(unet=unet.eval(), vae=vae.eval(), encoder_hidden_states=hidden, added_cond=added,
                       is_sdxl=is_sdxl, vocabulary=encoded)


def encode_token_ids(
    text_parts: list[tuple[Any, Any]], rows: list[torch.Tensor], is_sdxl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states (P, L, D) float32 of prompts given as token ids, one (P, L) tensor per
    text encoder, the way diffusers' pipelines encode a prompt: SD 1.x the last hidden state,
    the SDXL family both encoders' penultimate states concatenated (and the pooled embedding
    of the projection encoder)."""
    states, pooled = [], None
    for (tokenizer, encoder), ids in zip(text_parts, rows):
        if is_sdxl:
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            states.append(out.hidden_states[-2])
        else:
            mask = None
            if getattr(encoder.config, "use_attention_mask", False):
                mask = (torch.arange(ids.shape[1]) <= _eos_positions(ids, tokenizer)[:, None]).long()
            states.append(encoder(ids, attention_mask=mask)[0])
    return torch.cat(states, dim=-1).float(), pooled


def _eos_positions(ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Index of each row's first EOS: the tokenizer's attention mask covers BOS..EOS."""
    is_eos = ids == tokenizer.eos_token_id
    return torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((ids.shape[0],), ids.shape[1] - 1))


def sdxl_time_ids(unet, pooled_dim: int, image_size: int) -> torch.Tensor:
    """``add_time_ids`` as the SDXL pipelines build them for an S x S image, no crop.

    Base models: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
    Refiner-style UNets (``requires_aesthetics_score``) take
    (orig_h, orig_w, crop_top, crop_left, aesthetic_score=6.0); told apart by
    the size of ``add_embedding``'s input, as the pipelines check it.
    """
    per = unet.config.addition_time_embed_dim
    expected = unet.add_embedding.linear_1.in_features - pooled_dim
    base = [image_size, image_size, 0, 0, image_size, image_size]
    if per * len(base) == expected:
        values = base
    elif per * 5 == expected:
        values = [image_size, image_size, 0, 0, 6.0]
    else:
        raise ValueError(
            f"cannot build SDXL time ids: add_embedding expects {expected} time features, "
            f"not a multiple of addition_time_embed_dim={per} matching 5 or 6 values"
        )
    return torch.tensor([values], dtype=torch.float32)


# ----------------------------------------------------------------------------- helpers


def _single_file_is_sdxl(name: str, path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(name, f"not a readable .safetensors file ({type(exc).__name__}: {_first_line(exc)}).") from exc
    return any(k.startswith("conditioner.embedders.1.") for k in keys)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
