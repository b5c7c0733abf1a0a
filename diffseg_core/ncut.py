"""Normalized-cut grouping's kernels (DiffCut, Couairon et al., NeurIPS 2024), batched in torch.

1. `affinity`: W = ((cos_sim + 1) / 2) ** alpha over token features (alpha 10 in DiffCut);
2. `recursive_ncut`: recursive two-way normalized cut. Each segment solves (D - W) x = lambda D x
   through the symmetric form D^-1/2 (D - W) D^-1/2 (`torch.linalg.eigh`), splits the Fiedler
   vector at the best of evenly spaced thresholds (the minimum Ncut value) and is split while that
   value stays under ``threshold``; ``"auto"`` stops by the image's own spectrum instead
   (`spectral_split`, docs/design.md "The normalized cut's automatic stop"). All current segments
   of all images are one padded batch per recursion level: one eigen-solve call per level, no
   Python loop over images or nodes;
3. `segment_scores`: each segment's mean feature against every token's feature, cosine, mapped to
   [0, 1]: soft proposals whose bilinear upsampling and argmax is "upsample the features, take the
   segment of highest cosine similarity" (a constant shift and a linear upsampling commute);
4. `attention_tokens`: token features from DiffSeg's aggregated attention (rows of the random
   walk's transition matrix), pooled to at most ``max_tokens`` tokens.

The grouping step that uses them lives in `diffseg_core.grouping`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AUTO", "affinity", "recursive_ncut", "segment_scores", "attention_tokens", "spectral_split"]

AUTO = "auto"
NUM_CUTS = 32  # evenly spaced thresholds tried on each Fiedler vector
MAX_DEPTH = 8  # at most 2**8 segments per image
MIN_TOKENS = 4  # a segment with fewer tokens is not split
#: "auto": a segment is split while its Fiedler value is below this share of the median of its
#: spectrum (a structured segment's smallest eigenvalues stand apart from the bulk; noise's do not).
AUTO_RATIO = 0.5
_PAD_EIGENVALUE = 3.0  # above the normalised Laplacian's spectrum ([0, 2]): padding never is the Fiedler pair


def affinity(features: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, N, C) token features -> (B, N, N) float32 affinity ((cos + 1) / 2) ** alpha."""
    f = F.normalize(features.float(), dim=-1)
    return ((f @ f.transpose(1, 2) + 1) / 2).clamp_(0, 1).pow_(alpha)


def spectral_split(eigenvalues: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """"auto"'s rule per segment, (S, n) ascending eigenvalues (padding last) -> (S,) bool: split when
    the Fiedler value is under `AUTO_RATIO` times the median of the segment's nonzero spectrum."""
    n = valid.sum(1)
    spectrum = torch.where(valid, eigenvalues, torch.full_like(eigenvalues, float("inf")))
    # the median of eigenvalues 1..n-1 of each segment (padding sorts last, as +inf)
    middle = ((n - 1) // 2 + 1).clamp(max=eigenvalues.shape[1] - 1)
    median = spectrum.gather(1, middle[:, None])[:, 0]
    return eigenvalues[:, 1] < AUTO_RATIO * median


def recursive_ncut(weights: torch.Tensor, threshold: float | str) -> torch.Tensor:
    """(B, N, N) affinities -> (B, N) int64 segment ids 0..K_b-1 (numbered in split order).

    A segment is cut in two while its best cut's Ncut value is below ``threshold`` (a float) or,
    with ``"auto"``, while `spectral_split` says its spectrum has structure.
    """
    if weights.ndim != 3 or weights.shape[1] != weights.shape[2]:
        raise ValueError(f"weights: expected (B, N, N), got {tuple(weights.shape)}")
    batch, tokens = weights.shape[:2]
    device = weights.device
    labels = torch.zeros((batch, tokens), dtype=torch.long, device=device)
    counts = torch.ones(batch, dtype=torch.long, device=device)
    seg_image = torch.arange(batch, device=device)
    seg_id = torch.zeros(batch, dtype=torch.long, device=device)
    for _ in range(MAX_DEPTH):
        if seg_image.numel() == 0:
            break
        members = labels[seg_image] == seg_id[:, None]  # (S, N)
        sizes = members.sum(1)
        width = int(sizes.max())
        if width < MIN_TOKENS:
            break
        order = torch.argsort((~members).to(torch.int8), dim=1, stable=True)[:, :width]  # members first
        valid = torch.arange(width, device=device)[None] < sizes[:, None]
        sub = weights[seg_image[:, None, None], order[:, :, None], order[:, None, :]]
        sub = sub * (valid[:, :, None] & valid[:, None, :])
        split, side = _best_cuts(sub, valid, threshold)
        split &= sizes >= MIN_TOKENS
        labels, counts, seg_image, seg_id = _apply_splits(labels, counts, seg_image, seg_id, order, valid,
                                                          split, side)
    return labels


def _best_cuts(sub: torch.Tensor, valid: torch.Tensor, threshold: float | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, n, n) padded affinities -> (whether to split (S,), the side of each node (S, n) bool)."""
    degree = sub.sum(-1)
    degree = torch.where(valid, degree.clamp_min(1e-12), torch.ones_like(degree))
    scale = degree.rsqrt()
    laplacian = -(scale[:, :, None] * sub * scale[:, None, :])
    diagonal = torch.where(valid, torch.ones_like(degree), torch.full_like(degree, _PAD_EIGENVALUE))
    laplacian.diagonal(dim1=1, dim2=2).add_(diagonal)
    eigenvalues, eigenvectors = torch.linalg.eigh(laplacian)
    fiedler = eigenvectors[:, :, 1] * scale  # the generalised problem's eigenvector: D^-1/2 v
    low = torch.where(valid, fiedler, torch.full_like(fiedler, float("inf"))).amin(1)
    high = torch.where(valid, fiedler, torch.full_like(fiedler, -float("inf"))).amax(1)
    steps = torch.arange(1, NUM_CUTS + 1, device=sub.device, dtype=fiedler.dtype) / (NUM_CUTS + 1)
    cuts = low[:, None] + (high - low)[:, None] * steps[None]  # (S, T), strictly inside the range
    sides = (fiedler[:, None, :] > cuts[:, :, None]) & valid[:, None, :]  # (S, T, n)
    a = sides.to(sub.dtype)
    volume_a = a @ degree.unsqueeze(-1)  # (S, T, 1)
    volume = (degree * valid).sum(1)[:, None]
    within = ((a @ sub) * a).sum(-1)  # (S, T)
    volume_a = volume_a[..., 0]
    cut = volume_a - within
    value = cut / volume_a.clamp_min(1e-12) + cut / (volume - volume_a).clamp_min(1e-12)
    empty = (volume_a <= 1e-12) | (volume - volume_a <= 1e-12)
    value = torch.where(empty, torch.full_like(value, float("inf")), value)
    best_value, best = value.min(1)
    side = sides[torch.arange(sides.shape[0], device=sub.device), best]
    if threshold == AUTO:
        split = spectral_split(eigenvalues, valid) & torch.isfinite(best_value)
    else:
        split = best_value < float(threshold)
    return split, side


def _apply_splits(labels: torch.Tensor, counts: torch.Tensor, seg_image: torch.Tensor, seg_id: torch.Tensor,
                  order: torch.Tensor, valid: torch.Tensor, split: torch.Tensor, side: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each split segment's True side a new id in its image; the halves stay active."""
    per_image = F.one_hot(seg_image, labels.shape[0]) * split[:, None]  # (S, B)
    rank = (per_image.cumsum(0) * per_image).sum(1) - 1
    new_id = counts[seg_image] + rank
    counts = counts + per_image.sum(0)
    move = side & valid & split[:, None]
    rows = seg_image[:, None].expand_as(order)
    labels = labels.index_put((rows[move], order[move]), new_id[:, None].expand_as(order)[move])
    return labels, counts, torch.cat([seg_image[split], seg_image[split]]), torch.cat([seg_id[split], new_id[split]])


def segment_scores(features: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """(B, N, C) features and (B, N) segment ids -> per image (K_b, N) scores in [0, 1]:
    (cos(mean feature of segment k, feature of token) + 1) / 2."""
    f = features.float()
    out = []
    counts = labels.amax(1) + 1
    most = int(counts.max())
    one_hot = F.one_hot(labels, most).to(f.dtype)  # (B, N, K)
    means = F.normalize(one_hot.transpose(1, 2) @ f, dim=-1)  # (B, K, C)
    tokens = F.normalize(f, dim=-1)
    scores = (means @ tokens.transpose(1, 2) + 1) / 2  # (B, K, N)
    for b, k in enumerate(counts.tolist()):
        out.append(scores[b, :k])
    return out


def attention_tokens(aggregate: torch.Tensor, max_tokens: int, steps: int = 1) -> torch.Tensor:
    """(B, R*R, R*R) aggregated attention -> (B, r*r, r*r) token features: the rows of the random walk's
    transition matrix (the attention, to the power ``steps``), pooled 2 x 2 in queries and keys until
    at most ``max_tokens`` tokens remain (r = R / 2**k)."""
    walk = aggregate.float()
    for _ in range(steps - 1):
        walk = walk @ aggregate.float()
    side = math.isqrt(walk.shape[1])
    batch = walk.shape[0]
    while side * side > max_tokens and side % 2 == 0:
        grid = walk.reshape(batch * side * side, 1, side, side)
        walk = F.avg_pool2d(grid, 2).reshape(batch, side, side, -1)  # keys pooled
        walk = F.avg_pool2d(walk.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)  # queries pooled
        side //= 2
    return walk
