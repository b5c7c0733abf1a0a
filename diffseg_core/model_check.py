"""What a model is, from its configs and files, without loading a weight (and without torch).

The labeling job's driver must know, in a second and on a small head node, that a
model exists, that it has the parts DiffSeg needs, which attention resolutions and
native image size it gives, and where its weights are (for their provenance).
``check_model`` answers from the folder's ``config.json`` files, its file list and
the headers of its ``.safetensors`` files (a truncated file is caught here). Hub
ids are answered from the local Hugging Face cache, or with one short request to
the hub and no retries: an unreachable hub fails in seconds with one sentence
that names the fixes. Single-file checkpoints are only partly known here (their
configs come from diffusers when loading); ``ModelCheck.complete`` says so.

The weights themselves are loaded where they are used: by `model_loading`, in the
model actors.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from diffseg_core.model_error import ModelLoadError
from diffseg_core.tiny_model import TINY_DEMO, TINY_RANDOM, resolve_model

__all__ = [
    "ModelLoadError",
    "ModelCheck",
    "check_model",
    "load_tokenizers",
    "attention_resolutions",
    "self_attention_layer_count",
    "read_safetensors_header",
    "dtype_name",
    "hub_commit",
    "read_model_card",
]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
UNSAFE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Every way to opt in, for a message that reaches Python, CLI and job-spec users alike.
UNSAFE_WEIGHTS_HOW = ("pass allow_unsafe_weights=True (`diffseg label --allow-unsafe-weights`, or "
                      "`allow_unsafe_weights: true` under `model:` in a job spec)")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_CARD = "diffseg.json"  # optional, beside a diffusers folder's model_index.json: what the model is, its defaults
HUB_TIMEOUT_S = 5.0  # one request, no retries: an unreachable hub costs at most this

# UNet2DConditionModel's defaults for the keys read here (a config.json may omit them).
# tests/test_model_check.py checks them against the installed diffusers.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "addition_embed_type": None,
}
VAE_DEFAULTS: dict[str, Any] = {"block_out_channels": (64,)}
_DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


def dtype_name(dtype: str) -> str:
    """``"fp16"`` -> ``"float16"``: a dtype as the manifest records it (torch's name, without torch)."""
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


# ----------------------------------------------------------------------------- architecture from configs


def _listed(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def attention_resolutions(unet_config: Mapping[str, Any], latent_side: int) -> list[int]:
    """Side lengths of the self-attention maps of a UNet at a latent side, largest first.

    The latent side halves (rounding up, as a stride-2 convolution does) once per
    down block; blocks whose type has cross-attention carry transformer layers.
    """
    config = {**UNET_DEFAULTS, **unet_config}
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    sides = [int(latent_side)]
    for _ in down[1:]:
        sides.append((sides[-1] + 1) // 2)
    found = {side for side, kind in zip(sides, down) if "CrossAttn" in kind}
    found |= {side for side, kind in zip(reversed(sides), up) if "CrossAttn" in kind}
    if config["mid_block_type"] and "CrossAttn" in config["mid_block_type"]:
        found.add(sides[-1])
    return sorted(found, reverse=True)


def self_attention_layer_count(unet_config: Mapping[str, Any]) -> int:
    """How many ``attn1`` layers UNet2DConditionModel builds from this config (as its __init__ does)."""
    config = {**UNET_DEFAULTS, **unet_config}
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    layers = _listed(config["layers_per_block"], len(down))
    per_block = _listed(config["transformer_layers_per_block"], len(down))
    reverse = config["reverse_transformer_layers_per_block"]
    reverse = list(reverse) if reverse is not None else list(reversed(per_block))

    def block(num_layers: int, transformer_layers: Any) -> int:
        return sum(_listed(transformer_layers, num_layers)[:num_layers])

    count = sum(block(layers[i], per_block[i]) for i, kind in enumerate(down) if "CrossAttn" in kind)
    if config["mid_block_type"] == "UNetMidBlock2DCrossAttn":
        count += block(1, per_block[-1])
    reversed_layers = list(reversed(layers))
    count += sum(block(reversed_layers[i] + 1, reverse[i]) for i, kind in enumerate(up) if "CrossAttn" in kind)
    return count


# ----------------------------------------------------------------------------- the check's result


@dataclass(frozen=True)
class ModelCheck:
    """A model as its files describe it: enough for the manifest and the DiffSeg checks."""

    model: str  # as given
    resolved: str  # local path or hub id
    source: str  # "folder", "hub" or "single_file"
    revision: str | None = None  # hub commit
    unet_config: dict[str, Any] = field(default_factory=dict)
    vae_config: dict[str, Any] = field(default_factory=dict)
    weight_files: tuple[str, ...] = ()  # local weight files, for their sha256
    random_weights: bool = False
    architecture: str = "sd"  # "sd" or "sdxl"
    complete: bool = True  # False: single-file checkpoint, configs known only when loading
    card: dict[str, Any] = field(default_factory=dict)  # the folder's diffseg.json (tiny-demo has one), if any

    @property
    def vae_scale_factor(self) -> int:
        channels = self.vae_config.get("block_out_channels", VAE_DEFAULTS["block_out_channels"])
        return 2 ** (len(channels) - 1)

    @property
    def native_image_size(self) -> int:
        native = self.unet_config.get("sample_size")
        if native is None:
            raise ValueError("its unet config has no sample_size, so it has no native size: pass --image-size")
        return int(native if isinstance(native, int) else native[0]) * self.vae_scale_factor

    def image_size(self, requested: int | None) -> int:
        """The image size a run uses: the requested one (checked) or the model's native size."""
        size = int(requested) if requested is not None else self.native_image_size
        if size < self.vae_scale_factor or size % self.vae_scale_factor:
            raise ValueError(f"image_size {size} is not a positive multiple of the VAE factor {self.vae_scale_factor}")
        return size

    def attention_resolutions(self, image_size: int) -> list[int]:
        return attention_resolutions(self.unet_config, image_size // self.vae_scale_factor)

    def model_info(self, *, dtype: str, timestep: int, image_size: int, weights_sha256: dict[str, str] | None,
                   device: str) -> dict[str, Any]:
        """The provenance `AttentionExtractor.model_info` gives for the same model and settings."""
        return {
            "model": self.model,
            "resolved": self.resolved,
            "source": self.source,
            "revision": self.revision,
            "weights_sha256": weights_sha256,
            "architecture": self.architecture,
            "dtype": dtype_name(dtype),
            "device": device,
            "timestep": int(timestep),
            "image_size": int(image_size),
            "attention_resolutions": self.attention_resolutions(image_size),
            "self_attention_layers": self_attention_layer_count(self.unet_config),
            "random_weights": self.random_weights,
            **card_provenance(self.card),
        }


# ----------------------------------------------------------------------------- entry point


def check_model(model: str | os.PathLike, *, revision: str | None = None,
                allow_unsafe_weights: bool = False) -> ModelCheck:
    """Find a model and check it has what DiffSeg needs, reading configs and headers only.

    ``model``: a built-in name (``tiny-random``), a local diffusers folder, a single
    ``.safetensors`` file or a hub id. Raises `ModelLoadError` (one sentence).
    """
    name = os.fspath(model)
    random_weights = name == TINY_RANDOM
    path = Path(resolve_model(name)).expanduser()
    if path.is_file():
        return _check_single_file(name, path, allow_unsafe_weights)
    if path.is_dir():
        return _check_folder(name, path, allow_unsafe_weights, random_weights=random_weights)
    if looks_like_path(name):
        raise ModelLoadError(name, "no such file or folder.")
    return _check_hub(name, revision, allow_unsafe_weights)


def load_tokenizers(check: ModelCheck) -> list[Any]:
    """The checked model's tokenizer(s) alone (``tokenizer``, SDXL family also ``tokenizer_2``):
    no weights and no torch, what judging a vocabulary needs before any work. ``[]`` for a
    single-file checkpoint, which holds no tokenizer (its vocabulary is judged when it loads).
    Raises `ModelLoadError` when a tokenizer cannot be read."""
    from transformers import CLIPTokenizer

    if check.source == "single_file":
        return []
    if check.source == "hub":
        from huggingface_hub import hf_hub_download

        try:
            index = json.loads(Path(hf_hub_download(check.resolved, "model_index.json",
                                                    revision=check.revision)).read_text())
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(check.model, f"its model_index.json could not be read ({type(exc).__name__}).") from None
        where, parts = check.resolved, text_parts(index, lambda sub: index.get(sub, [None])[0] is not None)
    else:
        path = Path(check.resolved)
        where, parts = str(path), text_parts(read_model_index(path), lambda sub: (path / sub).is_dir())
    out = []
    for sub in parts:
        folder = sub.replace("text_encoder", "tokenizer")
        try:
            out.append(CLIPTokenizer.from_pretrained(where, subfolder=folder, revision=check.revision))
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(check.model, f"its '{folder}' could not be loaded ({type(exc).__name__}).") from None
    return out


def hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit hash of the cached snapshot that was loaded, if known."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "model_index.json", revision=revision)
        if isinstance(found, str):
            parts = Path(found).parts
            if "snapshots" in parts:
                return parts[parts.index("snapshots") + 1]
    except Exception:  # noqa: BLE001 - provenance is best effort
        pass
    return None


def looks_like_path(name: str) -> bool:
    """Anything that is not shaped like a hub id ``owner/name`` is a local path."""
    return not HUB_ID.match(name) or name.endswith(SINGLE_FILE_SUFFIXES)


# ----------------------------------------------------------------------------- folders


def _check_folder(name: str, path: Path, allow_unsafe: bool, *, random_weights: bool = False,
                  source: str = "folder", resolved: str | None = None, revision: str | None = None,
                  weights_present: bool = True) -> ModelCheck:
    """A diffusers folder (or a hub snapshot in the cache, with ``weights_present`` False when not downloaded)."""
    for sub in ("unet", "vae"):
        if not (path / sub).is_dir():
            raise ModelLoadError(name, f"the folder has no '{sub}' subfolder (expected a diffusers model folder).")
    index = read_model_index(path)
    parts = text_parts(index, lambda sub: (path / sub).is_dir())
    if not parts:
        raise ModelLoadError(name, "the folder has no 'text_encoder' subfolder (needed to encode the empty prompt).")
    for sub in parts:
        tokenizer = sub.replace("text_encoder", "tokenizer")
        if not (path / tokenizer).is_dir():
            raise ModelLoadError(name, f"the folder has '{sub}' but no '{tokenizer}' subfolder.")
    if weights_present:
        for sub in ("unet", "vae", *parts):
            check_weights(name, path / sub, allow_unsafe)
    unet_config = _read_config(name, path / "unet" / "config.json")
    vae_config = _read_config(name, path / "vae" / "config.json")
    files = folder_weight_files(path, parts) if weights_present else []
    for f in files:
        if f.endswith(".safetensors"):
            try:
                read_safetensors_header(f)
            except ValueError as exc:
                raise ModelLoadError(name, f"{Path(f).parent.name}/{Path(f).name}: {exc}.") from None
    return ModelCheck(
        model=name, resolved=resolved or str(path.resolve()), source=source, revision=revision,
        unet_config=unet_config, vae_config=vae_config,
        weight_files=tuple(files) if source == "folder" else (), random_weights=random_weights,
        architecture="sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd",
        card=read_model_card(path, name),
    )


def read_model_card(folder: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """The folder's ``diffseg.json`` (a JSON object), or ``{}`` when it has none.

    Keys read: ``description`` (what the model is, for manifests and the
    gallery), ``demo_model`` (true for a demo model that is not Stable
    Diffusion) and ``defaults`` (DiffSeg parameters that suit this model,
    used where the caller did not choose). A card that is not a JSON object
    is an error, not silently ignored.
    """
    card = Path(folder) / MODEL_CARD
    if not card.is_file():
        return {}
    try:
        data = json.loads(card.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(name or str(folder), f"its {MODEL_CARD} is not readable JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelLoadError(name or str(folder), f"its {MODEL_CARD} must hold a JSON object, not {type(data).__name__}.")
    return data


def card_provenance(card: Mapping[str, Any]) -> dict[str, Any]:
    """What a model card adds to the run's provenance: that it is a demo model, and its description."""
    info: dict[str, Any] = {}
    if card.get("demo_model"):
        info["demo_model"] = True
    if card.get("description"):
        info["description"] = str(card["description"])
    return info


def read_model_index(path: Path) -> dict[str, Any]:
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def text_parts(index: Mapping[str, Any], exists: Callable[[str], bool]) -> list[str]:
    """The text encoder subfolders to use: text_encoder and/or text_encoder_2."""
    return [sub for sub in ("text_encoder", "text_encoder_2") if (sub in index or not index) and exists(sub)]


def check_weights(name: str, folder: Path, allow_unsafe: bool) -> None:
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.name.endswith(".safetensors") for p in files):
        return
    unsafe = [p.name for p in files if p.name.endswith(UNSAFE_SUFFIXES)]
    if unsafe and not allow_unsafe:
        raise ModelLoadError(
            name,
            f"'{folder.name}' has only pickle weights ({', '.join(sorted(unsafe))}), no .safetensors; "
            f"to load them anyway (they can run code), {UNSAFE_WEIGHTS_HOW}.",
        )
    if not unsafe:
        raise ModelLoadError(name, f"'{folder.name}' has no weights file.")


def is_weight_file(p: Path) -> bool:
    return p.is_file() and p.name.endswith((".safetensors", *UNSAFE_SUFFIXES))


def folder_weight_files(path: Path, parts: list[str]) -> list[str]:
    """Every weight file of the subfolders a run loads (unet, vae, text encoders), sorted."""
    return sorted(str(p) for sub in ("unet", "vae", *parts) for p in (path / sub).iterdir() if is_weight_file(p))


def _read_config(name: str, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(name, f"'{path.parent.name}' has no config.json.") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(name, f"'{path.parent.name}/config.json' is not readable JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelLoadError(name, f"'{path.parent.name}/config.json' is not a JSON object.")
    return data


# ----------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a .safetensors file; ValueError if it is not one or is cut short.

    Format: an 8-byte little-endian header length, a JSON header whose tensors give
    ``data_offsets`` into the data that follows. The file must hold exactly that data.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"not a .safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length < 2 or 8 + length > size or length > 100 * 2**20:
            raise ValueError("not a .safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ValueError("not a .safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ValueError("not a .safetensors file (header is not a JSON object)")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise ValueError(f"truncated or padded: its header describes {expected} bytes, the file has {size}")
    return header


def _check_single_file(name: str, path: Path, allow_unsafe: bool) -> ModelCheck:
    if path.suffix != ".safetensors":
        if not allow_unsafe:
            raise ModelLoadError(
                name,
                f"'{path.suffix}' checkpoints are pickle files that can run code; "
                f"convert to .safetensors, or accept that risk: {UNSAFE_WEIGHTS_HOW}.",
            )
        return ModelCheck(model=name, resolved=str(path.resolve()), source="single_file",
                          weight_files=(str(path),), complete=False)
    try:
        header = read_safetensors_header(path)
    except ValueError as exc:
        raise ModelLoadError(name, f"not a readable .safetensors file ({exc}).") from None
    sdxl = any(k.startswith("conditioner.embedders.1.") for k in header)
    return ModelCheck(model=name, resolved=str(path.resolve()), source="single_file", weight_files=(str(path),),
                      architecture="sdxl" if sdxl else "sd", complete=False)


# ----------------------------------------------------------------------------- the hub


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or value.upper() in ("1", "ON", "YES", "TRUE")


def _no_hub(name: str, why: str) -> ModelLoadError:
    return ModelLoadError(
        name,
        f"{why}; to label without it pass {_offline_models()}, or --model /path/to/a/diffusers-folder with "
        "local weights, or download it once with network access and rerun with HF_HUB_OFFLINE=1.",
    )


def _offline_models() -> str:
    """The built-in models that need no download, as the fix to offer: tiny-demo where this install has it."""
    random = f"--model {TINY_RANDOM} (random weights, a smoke test)"
    try:
        demo = Path(resolve_model(TINY_DEMO)).is_dir()
    except Exception:  # noqa: BLE001 - no demo model in this install
        demo = False
    return f"--model {TINY_DEMO} (a small demo model shipped with diffseg) or {random}" if demo else random


def _check_hub(name: str, revision: str | None, allow_unsafe: bool) -> ModelCheck:
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "model_index.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id or revision: treat as not cached
        cached = None
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        commit = snapshot.name
        index = read_model_index(snapshot)
        parts = text_parts(index, lambda sub: index.get(sub, [None])[0] is not None)
        have_weights = all(
            (snapshot / sub).is_dir() and any(is_weight_file(p) for p in (snapshot / sub).iterdir())
            for sub in ("unet", "vae", *parts)
        )
        if have_weights or hub_offline():
            if not have_weights:
                raise _no_hub(name, "its weights are not in the Hugging Face cache (only its configs) and "
                                    "HF_HUB_OFFLINE is set")
            return _check_folder(name, snapshot, allow_unsafe, source="hub", resolved=name, revision=commit)
    elif hub_offline():
        raise _no_hub(name, "it is not a local path, and it is not in the Hugging Face cache while HF_HUB_OFFLINE "
                            "is set")
    return _check_hub_online(name, revision, allow_unsafe)


def _check_hub_online(name: str, revision: str | None, allow_unsafe: bool) -> ModelCheck:
    """One request for the repo's file list (no retries), then its three small configs."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelLoadError(name, "it is a gated repository: accept its licence on huggingface.co and set "
                                   "HF_TOKEN.") from None
    except RevisionNotFoundError:
        raise ModelLoadError(name, f"the hub repository has no revision {revision!r}.") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(name, "it is not a local path, and no such model exists on the Hugging Face hub "
                                   "(or it is private: set HF_TOKEN).") from None
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeout, proxy...
        raise _no_hub(name, f"the Hugging Face hub cannot be reached ({type(exc).__name__}) and the model is not "
                            "in the local cache") from None
    files = {s.rfilename for s in info.siblings or []}

    def fetch(filename: str) -> dict[str, Any]:
        try:
            return json.loads(Path(hf_hub_download(name, filename, revision=info.sha)).read_text())
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(name, f"its {filename} could not be read from the hub "
                                       f"({type(exc).__name__}).") from None

    index = fetch("model_index.json") if "model_index.json" in files else {}
    parts = text_parts(index, lambda sub: any(f.startswith(sub + "/") for f in files))
    for sub in ("unet", "vae", *parts):
        weights = [f for f in files if f.startswith(sub + "/") and f.count("/") == 1]
        if any(f.endswith(".safetensors") for f in weights):
            continue
        unsafe = [f for f in weights if f.endswith(UNSAFE_SUFFIXES)]
        if unsafe and not allow_unsafe:
            raise ModelLoadError(name, f"'{sub}' has only pickle weights on the hub ({', '.join(sorted(unsafe))}); "
                                       f"to load them anyway (they can run code), {UNSAFE_WEIGHTS_HOW}.")
        if not unsafe:
            raise ModelLoadError(name, f"the hub repository has no '{sub}' weights (expected a diffusers model).")
    unet_config = fetch("unet/config.json")
    return ModelCheck(
        model=name, resolved=name, source="hub", revision=info.sha, unet_config=unet_config,
        vae_config=fetch("vae/config.json"),
        architecture="sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd",
    )
