"""Self-attention extraction from a Stable Diffusion UNet (DESIGN.md steps 1-3).

    extractor = AttentionExtractor.from_pretrained("CompVis/stable-diffusion-v1-4")
    maps = extractor(images)   # {r: (B, r*r, r*r) float32}, rows sum to 1

1. Images -> RGB -> S x S (PIL bicubic, antialiased) -> [-1, 1];
   latent = VAE posterior mean x scaling_factor (no sampling, no noise).
   uint8 images already S x S go to the device as uint8 (pinned, asynchronous)
   and become floats there.  On a GPU the VAE encodes in bfloat16 by default
   (`resolve_vae_dtype`).
2. One UNet call at ``timestep`` (default 300) on the cached empty-prompt
   embedding (SDXL family: both encoders' penultimate states, pooled embeds
   and time ids, as the SDXL pipeline builds them).
3. Every ``attn1`` layer's softmax(QK^T/sqrt(d)) is averaged over heads as it
   is computed and then over the layers sharing a resolution; resolutions come
   from sequence lengths.  The UNet stops right after its last ``attn1`` layer.

With a vocabulary (``from_pretrained(..., vocabulary=...)``), `extract` also
returns, from the same UNet call, every ``attn2`` layer's softmax over the
vocabulary's classes (`diffseg_core.class_probe`), averaged over heads and
layers per resolution; the UNet then stops after its last ``attn2`` layer.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffseg_core.attention_capture import (
    DEFAULT_CHUNK_BYTES,
    CaptureState,
    StopUNet,
    head_sum_softmax,
    install_capture,
    install_feature_capture,
)
from diffseg_core.class_probe import ClassProbe, install_probe
from diffseg_core.model_check import attention_resolutions, card_provenance
from diffseg_core.model_loading import LoadedModel, ModelLoadError, load_model, sdxl_time_ids, sha256_files
from diffseg_core.tiny_model import TINY_RANDOM, resolve_model
from diffseg_core.vocabulary import Vocabulary

__all__ = ["AttentionExtractor", "Extraction", "ModelLoadError", "DEFAULT_MODEL", "preprocess_images", "resolve_vae_dtype"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}

ImagesLike = Any  # np.ndarray (B,H,W,3) uint8 | list of (H,W[,C]) uint8 arrays / PIL images | tensor (B,3,S,S)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 elsewhere unless told otherwise."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


#: Bound on one chunk of float32 attention probabilities on a GPU: fewer, larger
#: kernels (the CPU default keeps a chunk in cache).
GPU_CHUNK_BYTES = 1024 * 1024 * 1024


def resolve_vae_dtype(
    vae_dtype: str | torch.dtype | None, dtype: torch.dtype, device: torch.device, force_upcast: bool
) -> torch.dtype:
    """The VAE encoder's dtype; ``None`` or ``"auto"`` chooses:

    - on CUDA, bfloat16 when the GPU computes in it natively (Ampere and later): the
      encoder is the larger half of the work, and bfloat16 has float32's range, so
      none of the float16 overflow that ``force_upcast`` guards against; float32
      when the UNet runs in float32 (asked for exactness);
      on older GPUs float16 where the VAE's config says it is safe
      (``force_upcast`` false), else float32;
    - elsewhere (CPU), the UNet's dtype, float32 where that is float16 and the
      config asks for ``force_upcast``: the labels made on CPU so far stay as they were.
    """
    if vae_dtype is not None and str(vae_dtype).lower() != "auto":
        return resolve_dtype(vae_dtype, device)
    if device.type == "cuda":
        if dtype == torch.float32:
            return torch.float32
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32 if force_upcast else torch.float16
    return torch.float32 if (dtype == torch.float16 and force_upcast) else dtype


def preprocess_images(images: ImagesLike, size: int) -> torch.Tensor:
    """uint8 images of any size and mode -> float32 (B, 3, size, size) in [-1, 1] on CPU.

    Grayscale (H, W) / (H, W, 1) is replicated to RGB, grey+alpha and RGBA lose
    their alpha (as PIL's ``convert("RGB")``).  Resizing is PIL bicubic with
    antialiasing, straight to size x size (no crop, aspect not kept).
    """
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (np.ndarray, Image.Image)):
        images = [images]
    if len(images) == 0:
        raise ValueError("no images given")
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            pil = img.convert("RGB")
        else:
            pil = Image.fromarray(_to_rgb_uint8(np.asarray(img), i))
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(pil)
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


def _uint8_batch(images: Any, size: int) -> torch.Tensor | None:
    """A (B, size, size, 3) uint8 batch as a tensor (no copy), or None when it needs preprocessing."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            return None
        with warnings.catch_warnings():  # Ray hands read-only batches; they are only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(images))
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4:
        return images if images.shape[1:] == (size, size, 3) else None
    return None


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``.to`` that only passes a dtype when it changes (diffusers warns on every cast).

    A diffusers model with no ``_keep_in_fp32_modules`` (SD's AutoencoderKL) still warns
    "modules ... that should be kept in float32: []" on any cast: with nothing to keep,
    torch's own ``Module.to`` does the same cast without the noise (once per model actor).
    """
    current = next(module.parameters()).dtype
    if current == dtype:
        return module.to(device)
    if not getattr(module, "_keep_in_fp32_modules", None):
        return torch.nn.Module.to(module, device, dtype)
    return module.to(device, dtype)


@dataclass
class Extraction:
    """What one UNet pass gives: ``self_attention`` ``{r: (B, r*r, r*r)}`` (rows sum to 1) and,
    with a vocabulary, ``class_attention`` ``{r: (B, r*r, C)}`` (each query's softmax over the
    C classes, rows sum to 1), both float32 on the extractor's device; ``features`` (B, C, h, w), the
    output of the UNet encoder's last self-attention block (DiffCut's features), in the UNet's dtype."""

    self_attention: dict[int, torch.Tensor]
    class_attention: dict[int, torch.Tensor] | None = None
    features: torch.Tensor | None = None


def _to_rgb_uint8(a: np.ndarray, index: int) -> np.ndarray:
    if a.dtype != np.uint8:
        raise TypeError(f"image {index}: expected uint8 pixels, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 2:  # grey + alpha
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:  # RGBA
        a = a[:, :, :3]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image {index}: expected (H, W), (H, W, 1|2|3|4) pixels, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image {index}: empty image of shape {a.shape}")
    return np.ascontiguousarray(a)


class AttentionExtractor:
    """Images in, head- and layer-averaged self-attention maps out.

    Build with `from_pretrained`.  Holds the UNet on ``device`` in ``dtype``,
    the VAE encoder in ``vae_dtype`` (see `resolve_vae_dtype`), and the
    empty-prompt conditioning.

    GPU options (each runs on CPU too, where it buys nothing): ``sdpa_output``
    (default on CUDA; see `diffseg_core.attention_capture`), ``channels_last``
    (NHWC convolutions) and ``compile`` (``torch.compile`` of the VAE encoder,
    the UNet's resnets and the head-summed softmax, at fixed shapes).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        model: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        timestep: int = 300,
        image_size: int | None = None,
        early_stop: bool = True,
        chunk_bytes: int | None = None,
        random_weights: bool = False,
        vae_dtype: str | torch.dtype | None = None,
        sdpa_output: bool | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ):
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        self.timestep = int(timestep)
        self.unet = _move(loaded.unet, self.device, self.dtype)
        force_upcast = bool(getattr(loaded.vae.config, "force_upcast", False))
        self.vae_dtype = resolve_vae_dtype(vae_dtype, self.dtype, self.device, force_upcast)
        self.vae = _move(loaded.vae, self.device, self.vae_dtype)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        native = self.unet.config.sample_size
        native = native if isinstance(native, int) else int(native[0])
        self.image_size = int(image_size) if image_size is not None else native * self.vae_scale_factor
        if self.image_size % self.vae_scale_factor:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE factor {self.vae_scale_factor}")
        self.is_sdxl = loaded.is_sdxl
        self._hidden = loaded.encoder_hidden_states.to(self.device, self.dtype)
        self._text_embeds = loaded.added_cond.get("text_embeds")
        if self._text_embeds is not None:
            self._text_embeds = self._text_embeds.to(self.device, self.dtype)
        on_gpu = self.device.type == "cuda"
        if chunk_bytes is None:
            chunk_bytes = GPU_CHUNK_BYTES if on_gpu else DEFAULT_CHUNK_BYTES
        self._state = CaptureState(
            early_stop=early_stop, chunk_bytes=chunk_bytes, sdpa_output=on_gpu if sdpa_output is None else sdpa_output
        )
        self.layer_names = install_capture(self.unet, self._state)
        self.feature_layer_name = install_feature_capture(self.unet, self._state)
        self.vocabulary = loaded.vocabulary  # EncodedVocabulary or None
        self._probe = None
        self.probe_layer_names: list[str] = []
        if self.vocabulary is not None:
            self._probe = ClassProbe(self.vocabulary.embeddings, chunk_bytes=chunk_bytes)
            self.probe_layer_names = install_probe(self.unet, self._state, self._probe)
        self.compiled = bool(compile)
        if self.compiled:
            self._compile()
        self._loaded_info = {
            "model": model,
            "resolved": loaded.resolved,
            "source": loaded.source,
            "revision": loaded.revision,
        }
        self._weight_files = loaded.weight_files
        self._random_weights = random_weights
        self._card = dict(loaded.card)
        self._info: dict[str, Any] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        timestep: int = 300,
        image_size: int | None = None,
        revision: str | None = None,
        allow_unsafe_weights: bool = False,
        config: str | None = None,
        early_stop: bool = True,
        chunk_bytes: int | None = None,
        vae_dtype: str | torch.dtype | None = None,
        vocabulary: "str | list[str] | Vocabulary | None" = None,
        **gpu_options: Any,
    ) -> "AttentionExtractor":
        """Load a model: hub id, local diffusers folder, single ``.safetensors`` file, ``"tiny-random"``
        (random weights, plumbing only) or ``"tiny-demo"`` (small learned demo model shipped in the package).

        ``image_size=None`` means the model's native size
        (``unet.config.sample_size x VAE factor``: 512 for SD 1.x and
        SD 2.x-base, 1024 for SDXL, 128 for tiny-random, 256 for tiny-demo).  ``config`` is for
        single-file checkpoints offline: a diffusers folder with the same
        architecture's configs.  Raises `ModelLoadError` (an ``OSError``) when
        the model is missing or unreadable.  ``vae_dtype`` and ``gpu_options``
        (``sdpa_output``, ``channels_last``, ``compile``): see the class.

        ``vocabulary``: class names to probe for (a preset name such as
        ``"coco-stuff-27"``, ``"person,dog,grass"``, a list, or a `Vocabulary`);
        encoded once here by the model's text encoder(s).  Raises
        `diffseg_core.vocabulary.VocabularyError` (a ``ValueError``) for one
        that cannot be used.
        """
        name = os.fspath(model)
        resolve_dtype(dtype, torch.device(device or "cpu"))  # fail on a bad dtype before loading
        if vae_dtype is not None and str(vae_dtype).lower() != "auto":
            resolve_dtype(vae_dtype, torch.device(device or "cpu"))
        vocab = Vocabulary.parse(vocabulary) if vocabulary is not None else None  # before loading too
        random_weights = name == TINY_RANDOM
        resolved = resolve_model(name)
        loaded = load_model(
            resolved, revision=revision, allow_unsafe_weights=allow_unsafe_weights, config=config, vocabulary=vocab
        )
        if random_weights:
            logger.warning("AttentionExtractor: 'tiny-random' has RANDOM weights; its attention maps are meaningless")
        elif loaded.card.get("demo_model"):
            logger.info("AttentionExtractor: %r is a demo model, not Stable Diffusion: %s", name,
                        loaded.card.get("description", ""))
        return cls(
            loaded, model=name, device=device, dtype=dtype, timestep=timestep, image_size=image_size,
            early_stop=early_stop, chunk_bytes=chunk_bytes, random_weights=random_weights, vae_dtype=vae_dtype,
            **gpu_options,
        )

    # ------------------------------------------------------------------ properties

    @property
    def keep_layers(self) -> bool:
        """Also keep each layer's head-mean map after a call, in `last_layers` (for tests/analysis)."""
        return self._state.keep_layers

    @keep_layers.setter
    def keep_layers(self, value: bool) -> None:
        self._state.keep_layers = bool(value)
        if self._probe is not None:
            self._probe.keep_layers = bool(value)

    @property
    def last_layers(self) -> dict[str, torch.Tensor]:
        """Per-layer head-mean maps {layer name: (B, N, N)} of the last call when `keep_layers` is set;
        with a vocabulary, also each probed ``attn2`` layer's {name: (B, N, C)} of the last `extract`."""
        layers = dict(self._state.layers)
        if self._probe is not None:
            layers.update(self._probe.layers)
        return layers

    @property
    def early_stop(self) -> bool:
        return self._state.early_stop

    @early_stop.setter
    def early_stop(self, value: bool) -> None:
        self._state.early_stop = bool(value)

    @property
    def model_info(self) -> dict[str, Any]:
        """Provenance for manifests: model, resolved path or hub id, revision or weight sha256s, settings."""
        if self._info is None:
            info = dict(self._loaded_info)
            info["weights_sha256"] = sha256_files(self._weight_files) if self._weight_files else None
            info.update(
                architecture="sdxl" if self.is_sdxl else "sd",
                dtype=str(self.dtype).removeprefix("torch."),
                device=str(self.device),
                timestep=self.timestep,
                image_size=self.image_size,
                attention_resolutions=self.attention_resolutions,
                self_attention_layers=len(self.layer_names),
                random_weights=self._random_weights,
            )
            info.update(card_provenance(self._card))
            self._info = info
        return dict(self._info)

    @property
    def attention_resolutions(self) -> list[int]:
        """Side lengths of the self-attention maps this model gives at ``image_size``, largest first.

        From the UNet's config, without running it: the latent side, halved
        (rounding up, as a stride-2 convolution does) once per down block.
        """
        return attention_resolutions(self.unet.config, self.image_size // self.vae_scale_factor)

    # ------------------------------------------------------------------ the work

    @torch.inference_mode()
    def __call__(self, images: ImagesLike) -> dict[int, torch.Tensor]:
        """Self-attention maps ``{r: (B, r*r, r*r) float32}`` on ``self.device``; rows sum to 1.

        ``images``: uint8 (B, H, W, 3) array, a list of uint8 arrays of any
        sizes (grayscale/RGBA too) or PIL images, or a float tensor
        (B, 3, S, S) already in [-1, 1] (used as given, S a multiple of 8).
        """
        return self.attention(self.encode(self.to_pixels(images)))

    @torch.inference_mode()
    def extract(self, images: ImagesLike) -> Extraction:
        """Self-attention maps, the encoder's last self-attention block's features and, with a
        vocabulary, class attention, from one UNet pass."""
        return self._unet_pass(self.encode(self.to_pixels(images)), probe=self.vocabulary is not None)

    def to_pixels(self, images: ImagesLike) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1]: preprocessed images, or a float tensor as given.

        A uint8 (B, S, S, 3) batch already at the model's size (array or tensor)
        is not preprocessed on the host: it goes to the device as uint8 (pinned
        and asynchronous on CUDA) and becomes float32 there, the very values
        `preprocess_images` would give.
        """
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
                raise ValueError(f"float image tensors must be (B, 3, S, S) in [-1, 1], got {tuple(images.shape)}")
            return images
        batch = _uint8_batch(images, self.image_size)
        if batch is not None:
            if batch.device != self.device:
                if self.device.type == "cuda" and not batch.is_pinned():
                    batch = batch.pin_memory()
                batch = batch.to(self.device, non_blocking=True)
            return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        return preprocess_images(images, self.image_size)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean x scaling_factor, in the UNet's dtype."""
        x = pixels.to(self.device, self.vae_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        mean = self.vae.encode(x).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            mean = mean - shift
        return (mean * self.vae.config.scaling_factor).to(self.dtype)

    @torch.inference_mode()
    def attention(self, latents: torch.Tensor) -> dict[int, torch.Tensor]:
        """One UNet call on clean latents; returns the captured maps (no vocabulary probe)."""
        return self._unet_pass(latents, probe=False).self_attention

    @torch.inference_mode()
    def _unet_pass(self, latents: torch.Tensor, probe: bool) -> Extraction:
        b = latents.shape[0]
        kwargs: dict[str, Any] = {}
        if self.is_sdxl:
            size = latents.shape[-1] * self.vae_scale_factor
            time_ids = sdxl_time_ids(self.unet, self._text_embeds.shape[-1], size).to(self.device, self.dtype)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self._text_embeds.expand(b, -1),
                "time_ids": time_ids.expand(b, -1),
            }
        t = torch.tensor(self.timestep, device=self.device, dtype=torch.long)
        state = self._state
        state.begin(probe=probe)
        if probe:
            self._probe.reset()
        state.active = True
        try:
            self.unet(latents, t, encoder_hidden_states=self._hidden.expand(b, -1, -1), return_dict=False, **kwargs)
        except StopUNet:
            pass
        finally:
            state.active = False
        if state.seen != state.num_layers:
            state.reset()
            raise RuntimeError(f"captured {state.seen} of {state.num_layers} attention layers")
        features, state.features = state.features, None
        return Extraction(state.result(), self._probe.result() if probe else None, features)

    def _compile(self) -> None:
        """torch.compile the parts with fixed shapes and no Python state (the capture hooks stay eager)."""
        self.vae.encoder = torch.compile(self.vae.encoder, dynamic=False)
        for stage in (*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks):
            resnets = getattr(stage, "resnets", None) if stage is not None else None
            for i in range(len(resnets or [])):
                resnets[i] = torch.compile(resnets[i], dynamic=False)
        self._state.head_sum = torch.compile(head_sum_softmax, dynamic=False)

    def __repr__(self) -> str:
        return (
            f"AttentionExtractor(model={self._loaded_info['model']!r}, device={self.device}, dtype={self.dtype}, "
            f"vae_dtype={self.vae_dtype}, "
            f"image_size={self.image_size}, timestep={self.timestep}, layers={len(self.layer_names)}"
            + (f", classes={len(self.vocabulary.names)})" if self.vocabulary is not None else ")")
        )
