"""The normalized-cut grouping (``DiffSeg(grouping="ncut")``): tokens -> affinity -> recursive
two-way normalized cut -> soft proposals, which DiffSeg's NMS, PAMR and clean-up take unchanged.

It replaces DiffSeg's KL merge (steps 2-4 of `diffseg_core.segmentor`) as DiffCut (Couairon et
al., NeurIPS 2024) does, on one of two kinds of tokens (``affinity``):

- ``"attention"``: the rows of DiffSeg's own aggregated self-attention, each query's transition
  probabilities of the attention's random walk (Ivanova et al., WACV 2026, cut the same matrix),
  pooled to at most ``max_tokens`` tokens;
- ``"features"``: the output of the UNet encoder's last self-attention block, DiffCut's
  features, captured in the same UNet pass (`diffseg_core.extract.Extraction.features`), pooled
  2 x 2 likewise.

The steps, read top to bottom:

1. tokens (B, N, C) from the aggregate or the features;
2. affinity W = ((cos + 1) / 2) ** alpha (alpha 10, DiffCut's);
3. the recursive cut (`diffseg_core.ncut.recursive_ncut`), batched over the images: a segment
   is split while its best cut's Ncut value is under ``threshold``, or, with ``"auto"``, while
   its spectrum has structure (docs/design.md, "The normalized cut's automatic stop");
4. each segment's mean token against every token, cosine mapped to [0, 1]: (K, r, r) proposals.
   Bilinear upsampling and the per-pixel argmax (DiffSeg's NMS) then give each pixel the segment
   of highest similarity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffseg_core import ncut

__all__ = ["DEFAULT_ALPHA", "DEFAULT_MAX_TOKENS", "ncut_proposals", "cut_tokens"]

DEFAULT_ALPHA = 10.0
#: The cut's eigen-solves grow as N^3: tokens are pooled 2 x 2 until at most this many remain
#: (SD 1.x at 512 px: 64 x 64 attention -> 16 x 16 tokens; tiny-demo's 32 x 32 -> 16 x 16).
DEFAULT_MAX_TOKENS = 256


def cut_tokens(aggregate: torch.Tensor | None, features: torch.Tensor | None, affinity: str,
               max_tokens: int = DEFAULT_MAX_TOKENS) -> torch.Tensor:
    """Step 1: (B, N, C) float32 tokens on a square r x r grid, N = r * r."""
    if affinity == "attention":
        if aggregate is None:
            raise ValueError("ncut_affinity='attention' needs the aggregated attention")
        return ncut.attention_tokens(aggregate, max_tokens)
    if affinity == "features":
        if features is None or features.ndim != 4:
            raise ValueError("ncut_affinity='features' needs the UNet's encoder features, (B, C, h, w), from "
                             "the same pass (AttentionExtractor.extract)")
        if features.shape[-1] != features.shape[-2]:
            raise ValueError(f"features: expected a square grid, got {tuple(features.shape[-2:])}")
        grid = features.float()
        while grid.shape[-1] ** 2 > max_tokens and grid.shape[-1] % 2 == 0:  # as the attention's tokens
            grid = F.avg_pool2d(grid, 2)
        return grid.flatten(2).transpose(1, 2)
    raise ValueError(f"ncut_affinity must be 'attention' or 'features', not {affinity!r}")


def ncut_proposals(aggregate: torch.Tensor | None, features: torch.Tensor | None, *, threshold: float | str,
                   affinity: str = "attention", alpha: float = DEFAULT_ALPHA,
                   max_tokens: int = DEFAULT_MAX_TOKENS) -> list[torch.Tensor]:
    """Steps 1-4 for a batch: per image (K_b, r, r) float32 proposals in [0, 1] (K_b >= 1)."""
    tokens = cut_tokens(aggregate, features, affinity, max_tokens)  # 1
    weights = ncut.affinity(tokens, alpha)  # 2
    labels = ncut.recursive_ncut(weights, threshold)  # 3
    side = math.isqrt(tokens.shape[1])
    return [s.reshape(-1, side, side) for s in ncut.segment_scores(tokens, labels)]  # 4
