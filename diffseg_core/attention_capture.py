"""Capture of self-attention probabilities inside a diffusers UNet.

`SelfAttentionCaptureProcessor` replaces the processor of every ``attn1``
(self-attention) layer of a ``UNet2DConditionModel``.  It computes
softmax(QK^T * scale) one chunk of heads (and, if needed, of queries) at a time,
adds the head-mean of the probabilities into one float32 buffer per resolution
held by a shared `CaptureState`, and computes the layer's output from the same
probabilities (so QK^T is computed once, not once for the output and once for
the capture).  Peak extra memory per layer is one chunk of probabilities plus the
per-resolution buffer; all heads of all layers are never held at once.

Every other attention layer (``attn2`` cross-attention, the VAE's attention)
keeps diffusers' `AttnProcessor2_0` (scaled_dot_product_attention), unless a
vocabulary is set: then ``attn2`` layers get `diffseg_core.class_probe`'s
processor, which computes the same output and probes the vocabulary beside it.

With ``CaptureState.sdpa_output`` (the extractor sets it on GPUs) the layer's
output comes from ``scaled_dot_product_attention`` instead, and the
probabilities are only summed over heads: QK^T is computed twice, but the
(B, heads, N, N) probabilities are neither cast nor read a second time, which
on a GPU is memory traffic, the scarce resource there.

The processor is modelled on diffusers' ``AttnProcessor2_0``.

`install_feature_capture` also keeps, from the same call, the output of the UNet encoder's last
self-attention (transformer) block, the features DiffCut cuts (`feature_block` finds it from the
model: the last transformer of the deepest down block that has attention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

__all__ = [
    "CaptureState",
    "head_sum_softmax",
    "SelfAttentionCaptureProcessor",
    "StopUNet",
    "attention_layers",
    "feature_block",
    "install_capture",
    "install_feature_capture",
    "self_attention_layers",
]

# Default bound on one chunk of float32 attention probabilities (bytes).
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


class StopUNet(Exception):
    """Raised by the last self-attention layer to skip the rest of the UNet.

    Private control flow: the extractor catches it around the UNet call.  Not an
    error, so it does not subclass RuntimeError.
    """


@dataclass
class CaptureState:
    """Per-call accumulation shared by all capture processors of one UNet.

    ``sums[r]`` is the running sum over layers of the head-mean probabilities
    (B, r*r, r*r) float32; ``counts[r]`` the number of layers added.  With
    ``keep_layers`` each layer's head-mean is also kept in ``layers[name]``
    (for tests and analysis; costs one buffer per layer).

    ``num_layers``/``last_layer``: the layers one call must see and the one
    it stops after, set by `begin` (with the vocabulary probe, the ``attn2``
    layers count too and the last of them comes after the last ``attn1``).
    """

    num_layers: int = 0
    last_layer: str | None = None
    self_layers: int = 0
    last_self_layer: str | None = None
    probe_layers: int = 0
    last_probe_layer: str | None = None
    probe_active: bool = False
    early_stop: bool = True
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    active: bool = False
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    seen: int = 0
    keep_layers: bool = False
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    sdpa_output: bool = False
    head_sum: Callable[[torch.Tensor], torch.Tensor] | None = None  # e.g. a compiled `head_sum_softmax`
    features: torch.Tensor | None = None  # (B, C, h, w): the encoder's last transformer block's output

    def reset(self) -> None:
        self.sums = {}
        self.counts = {}
        self.layers = {}
        self.seen = 0
        self.features = None

    def begin(self, probe: bool = False) -> None:
        """Start a call, with or without the ``attn2`` probe (see `diffseg_core.class_probe`)."""
        self.reset()
        self.probe_active = bool(probe and self.probe_layers)
        self.num_layers = self.self_layers + (self.probe_layers if self.probe_active else 0)
        self.last_layer = self.last_probe_layer if self.probe_active else self.last_self_layer

    def add(self, head_sum: torch.Tensor, resolution: int, rows: slice, heads: int, name: str) -> None:
        """Add a chunk (B, q, N) of probabilities summed over some heads, divided by ``heads``."""
        targets = [(self.sums, resolution)]
        if self.keep_layers:
            targets.append((self.layers, name))
        for store, key in targets:
            buf = store.get(key)
            if buf is None:
                b, _, n = head_sum.shape
                buf = torch.zeros(b, n, n, dtype=torch.float32, device=head_sum.device)
                store[key] = buf
            buf[:, rows].add_(head_sum, alpha=1.0 / heads)

    def finish_layer(self, resolution: int) -> None:
        self.counts[resolution] = self.counts.get(resolution, 0) + 1
        self.seen += 1

    def result(self) -> dict[int, torch.Tensor]:
        """Layer-mean per resolution, in place (the buffers are handed out)."""
        out = {}
        for r in sorted(self.sums):
            out[r] = self.sums[r].div_(self.counts[r])
        self.sums, self.counts = {}, {}
        return out


def head_sum_softmax(scores: torch.Tensor) -> torch.Tensor:
    """(B, h, q, N) scores -> (B, q, N) float32: the softmax over keys, summed over the h heads."""
    return scores.softmax(dim=-1, dtype=torch.float32).sum(dim=1)


def resolution_from_length(seq_len: int) -> int:
    """Side of the square token grid with ``seq_len`` tokens."""
    r = math.isqrt(seq_len)
    if r * r != seq_len:
        raise ValueError(
            f"self-attention sequence length {seq_len} is not a square; "
            "the extractor needs square latents (resize images to image_size x image_size)"
        )
    return r


class SelfAttentionCaptureProcessor:
    """Self-attention processor that also records head-averaged probabilities.

    Scores are computed in the model's dtype and the softmax in float32
    (like diffusers' ``upcast_softmax``); the layer output uses the same
    probabilities cast back to the model's dtype.  With float32 weights the
    output equals the standard attention output up to rounding.
    """

    def __init__(self, name: str, state: CaptureState):
        self.name = name
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if not self.state.active or encoder_hidden_states is not None or attention_mask is not None:
            # Not inside an extraction call, or an attn1 used as cross-attention
            # (only_cross_attention models) / with a mask: behave like diffusers.
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, seq_len, _ = hidden_states.shape

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        resolution = resolution_from_length(seq_len)
        state = self.state
        is_last = state.early_stop and self.name == state.last_layer
        # The output of the last layer is never used when the UNet stops there.
        need_output = not (is_last and state.seen + 1 == state.num_layers)
        out = None
        if need_output and state.sdpa_output:
            out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        elif need_output:
            out = torch.empty_like(query)
        probs_out = out if need_output and not state.sdpa_output else None

        head_chunk, query_chunk = _chunks(batch_size, heads, seq_len, state.chunk_bytes)
        if attn.upcast_attention:  # e.g. SD 2.1-v: fp16 QK^T overflows, score in fp32 like diffusers
            query, key = query.float(), key.float()
        query = query * attn.scale  # scale before the product, as SDPA does (fp16 range)
        key_t = key.transpose(-1, -2)
        for h0 in range(0, heads, head_chunk):
            hs = slice(h0, min(h0 + head_chunk, heads))
            for q0 in range(0, seq_len, query_chunk):
                qs = slice(q0, min(q0 + query_chunk, seq_len))
                scores = torch.matmul(query[:, hs, qs], key_t[:, hs])
                if probs_out is None:
                    summed = (state.head_sum or head_sum_softmax)(scores)
                    del scores
                    state.add(summed, resolution, qs, heads, self.name)
                    del summed
                    continue
                probs = scores.softmax(dim=-1, dtype=torch.float32)
                del scores
                state.add(probs.sum(dim=1), resolution, qs, heads, self.name)
                probs_out[:, hs, qs] = torch.matmul(probs.to(value.dtype), value[:, hs])
                del probs
        state.finish_layer(resolution)

        if out is None:
            raise StopUNet
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _chunks(batch: int, heads: int, seq_len: int, chunk_bytes: int) -> tuple[int, int]:
    """Heads per chunk and queries per chunk so one fp32 chunk fits ``chunk_bytes``."""
    per_head = batch * seq_len * seq_len * 4
    if per_head <= chunk_bytes:
        return max(1, min(heads, chunk_bytes // per_head)), seq_len
    per_query = batch * seq_len * 4
    return 1, max(1, min(seq_len, chunk_bytes // per_query))


def self_attention_layers(unet: torch.nn.Module) -> list[tuple[str, Attention]]:
    """All ``attn1`` layers of a UNet, in execution order (down, mid, up)."""
    return attention_layers(unet, "attn1")


def attention_layers(unet: torch.nn.Module, kind: str) -> list[tuple[str, Attention]]:
    """All ``kind`` (``attn1`` or ``attn2``) layers of a UNet, in execution order (down, mid, up).

    Module registration order is not execution order for
    ``UNet2DConditionModel`` (``mid_block`` is registered after ``up_blocks``),
    so walk the three stages explicitly; within a block, registration order is
    execution order.
    """
    stages: list[tuple[str, torch.nn.Module]] = []
    for prefix in ("down_blocks", "mid_block", "up_blocks"):
        module = getattr(unet, prefix, None)
        if module is not None:
            stages.append((prefix, module))
    if not stages:
        stages = [("", unet)]
    layers = []
    for prefix, module in stages:
        for name, sub in module.named_modules():
            if isinstance(sub, Attention) and name.split(".")[-1] == kind:
                layers.append((f"{prefix}.{name}" if prefix else name, sub))
    return layers


def install_capture(unet: torch.nn.Module, state: CaptureState) -> list[str]:
    """Put capture processors on every attn1 layer and SDPA on every other one.

    Returns the captured layer names in execution order; sets
    ``state.self_layers`` and ``state.last_self_layer`` (and, until `begin`
    says otherwise, ``num_layers`` and ``last_layer``).
    """
    layers = self_attention_layers(unet)
    if not layers:
        raise ValueError("the UNet has no 'attn1' self-attention layers to capture")
    captured = {id(m) for _, m in layers}
    for module in unet.modules():
        if isinstance(module, Attention) and id(module) not in captured:
            module.set_processor(AttnProcessor2_0())
    for name, module in layers:
        module.set_processor(SelfAttentionCaptureProcessor(name, state))
    state.self_layers = state.num_layers = len(layers)
    state.last_self_layer = state.last_layer = layers[-1][0]
    return [name for name, _ in layers]


def feature_block(unet: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The encoder's last self-attention block: the last transformer of the deepest down block with
    attention (SD 1.x: ``down_blocks.2.attentions.1``; SDXL / SSD-1B: ``down_blocks.2.attentions.1`` too,
    their last down block being the one with attention)."""
    blocks = list(getattr(unet, "down_blocks", None) or [])
    for index in range(len(blocks) - 1, -1, -1):
        attentions = getattr(blocks[index], "attentions", None)
        if attentions is not None and len(attentions):
            return f"down_blocks.{index}.attentions.{len(attentions) - 1}", attentions[-1]
    raise ValueError("the UNet has no down block with attention, so no encoder features to capture")


def install_feature_capture(unet: torch.nn.Module, state: CaptureState) -> str:
    """Keep `feature_block`'s output in ``state.features`` during extraction calls (a reference to a
    tensor the UNet computes anyway: no extra work). Returns the block's name."""
    name, block = feature_block(unet)

    def keep(_module: torch.nn.Module, _inputs: tuple, output: object) -> None:
        if state.active:
            state.features = output[0] if isinstance(output, tuple) else output.sample

    block.register_forward_hook(keep)
    return name
