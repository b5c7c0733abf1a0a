"""Cross-attention of the image queries on a vocabulary, inside the one UNet pass.

`ClassProbeProcessor` replaces the processor of every ``attn2`` (cross-attention)
layer while a vocabulary is set.  The layer's output is computed exactly as
before, by diffusers' `AttnProcessor2_0` on the conditioning the UNet is given
(the empty prompt), so nothing downstream changes: the self-attention maps and
the segments are the same with and without a vocabulary.  Beside it, the
processor computes softmax(Q K_vocab^T / sqrt(d)) from the layer's own
``to_q`` on the image queries and its own ``to_k`` on the encoded vocabulary
(one key per class), averages it over heads and adds it into one float32
(B, r*r, C) buffer per resolution.  The vocabulary's keys are computed once per
layer and kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffseg_core.attention_capture import CaptureState, StopUNet, attention_layers

__all__ = ["ClassProbe", "ClassProbeProcessor", "install_probe"]


@dataclass
class ClassProbe:
    """The encoded vocabulary (C, D) and the per-call sums of class probabilities.

    ``sums[r]``: (B, r*r, C) float32, the sum over layers of the head-mean
    probabilities; ``counts[r]`` the layers added.  With ``keep_layers`` each
    layer's head-mean is also kept in ``layers[name]`` (tests and analysis).
    """

    embeddings: torch.Tensor  # (C, D) float32, CPU
    chunk_bytes: int = 256 * 1024 * 1024
    keep_layers: bool = False
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    _keys: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.embeddings.shape[0])

    def reset(self) -> None:
        self.sums, self.counts, self.layers = {}, {}, {}

    def keys(self, name: str, attn: Attention, like: torch.Tensor) -> torch.Tensor:
        """(heads, C, d) keys of the vocabulary through this layer's ``to_k`` (cached)."""
        cache_key = (name, like.device, like.dtype)
        keys = self._keys.get(cache_key)
        if keys is None:
            text = self.embeddings.to(like.device, like.dtype)[None]
            if attn.norm_cross:
                text = attn.norm_encoder_hidden_states(text)
            keys = attn.to_k(text)
            heads = attn.heads
            keys = keys.view(1, -1, heads, keys.shape[-1] // heads).transpose(1, 2)
            if attn.norm_k is not None:
                keys = attn.norm_k(keys)
            keys = keys[0].contiguous()
            self._keys[cache_key] = keys
        return keys

    def add(self, name: str, attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> None:
        """Probe one layer on its input ``hidden_states`` (what ``attn2`` gets as queries)."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        resolution = math.isqrt(seq_len)
        if resolution * resolution != seq_len:
            raise ValueError(f"cross-attention sequence length {seq_len} is not a square")

        keys = self.keys(name, attn, hidden_states)  # (heads, C, d)
        heads, classes, head_dim = keys.shape
        query = attn.to_q(hidden_states).view(batch, seq_len, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.upcast_attention:
            query, keys = query.float(), keys.float()
        query = query * attn.scale
        keys_t = keys.transpose(-1, -2)
        per_head = batch * seq_len * classes * 4
        chunk = max(1, min(heads, self.chunk_bytes // max(per_head, 1)))
        head_sum = torch.zeros(batch, seq_len, classes, dtype=torch.float32, device=hidden_states.device)
        for h0 in range(0, heads, chunk):
            hs = slice(h0, min(h0 + chunk, heads))
            probs = torch.matmul(query[:, hs], keys_t[hs]).softmax(dim=-1, dtype=torch.float32)
            head_sum += probs.sum(dim=1)
            del probs
        head_mean = head_sum.div_(heads)
        if self.keep_layers:
            self.layers[name] = head_mean.clone()
        total = self.sums.get(resolution)
        if total is None:
            self.sums[resolution] = head_mean
        else:
            total += head_mean
        self.counts[resolution] = self.counts.get(resolution, 0) + 1

    def result(self) -> dict[int, torch.Tensor]:
        """Layer-mean per resolution ``{r: (B, r*r, C)}`` (the buffers are handed out)."""
        out = {r: self.sums[r].div_(self.counts[r]) for r in sorted(self.sums)}
        self.sums, self.counts = {}, {}
        return out


class ClassProbeProcessor:
    """``attn2`` processor: the layer's usual output, plus the probe while the extractor asks.

    ``state`` is the extractor's `CaptureState`: it says whether this call
    probes (``state.probe_active``), counts the layer as seen, and stops the
    UNet after the last probed layer when early stopping.
    """

    def __init__(self, name: str, state: CaptureState, probe: ClassProbe):
        self.name = name
        self.state = state
        self.probe = probe
        self._attention = AttnProcessor2_0()

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
        state = self.state
        probing = state.active and state.probe_active and encoder_hidden_states is not None
        stop = probing and state.early_stop and self.name == state.last_layer and state.seen + 1 == state.num_layers
        out = None
        if not stop:  # the output of the layer the UNet stops at is never used
            out = self._attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if probing:
            self.probe.add(self.name, attn, hidden_states, temb)
            state.seen += 1
        if stop:
            raise StopUNet
        return out


def install_probe(unet: torch.nn.Module, state: CaptureState, probe: ClassProbe) -> list[str]:
    """Put probe processors on every ``attn2`` layer (after `install_capture`).

    Returns the probed layer names in execution order and tells ``state`` how
    many there are and which comes last (where a probing call stops the UNet).
    """
    layers = attention_layers(unet, "attn2")
    if not layers:
        raise ValueError("the UNet has no 'attn2' cross-attention layers to name classes with")
    for name, module in layers:
        module.set_processor(ClassProbeProcessor(name, state, probe))
    state.probe_layers = len(layers)
    state.last_probe_layer = layers[-1][0]
    return [name for name, _ in layers]
