"""Small SD-like self-attention with a planted segmentation, for fast tests.

Each resolution r gets attention whose logits are a feature similarity (one
feature per planted region, plus noise) minus a spatial locality term, softmaxed
over keys: maps concentrate on the query's own region, as Stable Diffusion's do.
"""
from __future__ import annotations

import torch


def planted_regions(r: int, centres: torch.Tensor) -> torch.Tensor:
    """(r*r,) region index of every cell of an r x r grid: the nearest centre (Voronoi)."""
    ys, xs = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    pos = (torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float() + 0.5) / r
    return torch.cdist(pos, centres).argmin(1)


def planted_maps(
    resolutions: tuple[int, ...] = (16, 8),
    regions: int = 4,
    heads: int = 2,
    batch: int = 1,
    seed: int = 0,
    sharpness: float = 6.0,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Return ({r: (batch, heads, r*r, r*r)}, planted truth (batch, R, R))."""
    g = torch.Generator().manual_seed(seed)
    maps: dict[int, list[torch.Tensor]] = {r: [] for r in resolutions}
    truth = []
    R = max(resolutions)
    for _ in range(batch):
        centres = torch.rand(regions, 2, generator=g)
        for r in resolutions:
            region = planted_regions(r, centres)
            ys, xs = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
            pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float() / r
            per_head = []
            for _ in range(heads):
                feats = torch.nn.functional.one_hot(region, regions).float()
                feats = feats + 0.05 * torch.randn(feats.shape, generator=g)
                logits = sharpness * feats @ feats.T - torch.cdist(pos, pos).square() / (2 * 0.5**2)
                per_head.append(torch.softmax(logits, -1))
            maps[r].append(torch.stack(per_head))
        truth.append(planted_regions(R, centres).reshape(R, R))
    return {r: torch.stack(v) for r, v in maps.items()}, torch.stack(truth)


def agreement(pred, truth) -> float:
    """Fraction of pixels that agree after one-to-one (Hungarian) matching of label ids."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(pred, dtype=np.int64).ravel()
    b = np.asarray(truth, dtype=np.int64).ravel()
    confusion = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(confusion, (a, b), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return confusion[rows, cols].sum() / a.size


def paired_block_attention(
    r: int, split: tuple[int, int], close: float = 0.85, apart: float = 0.95, floor: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-resolution attention whose best KL threshold is known by construction.

    The r x r grid is cut at ``split`` = (row, col) into four rectangles A (top
    left), B (top right), C (bottom left), D (bottom right). Every query of a
    rectangle has the same attention map: mostly on its own rectangle, some on
    its partner (A with B, C with D), a uniform ``floor``. The partner weights
    are solved so the symmetric KL between A's and B's maps is ``close`` and
    between C's and D's is ``apart``; every other pair is far apart (> 4).
    Ground truth gives A and B one class (0), C and D their own (1, 2). So
    DiffSeg labels the image exactly right for close <= tau < apart, and never
    outside: too low keeps A and B apart, too high joins C and D.

    Returns (maps (1, r*r, r*r) float32, rectangle index (r, r): A=0 .. D=3, classes (r, r)).
    """
    from scipy.optimize import brentq

    rows, cols = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    rect = (rows >= split[0]).long() * 2 + (cols >= split[1]).long()
    masks = [(rect == i).reshape(-1).double() for i in range(4)]
    n = r * r

    def pair(own: int, other: int, weight: float) -> torch.Tensor:
        m = masks[own] / masks[own].sum() + weight * masks[other] / masks[other].sum() + floor / n
        return m / m.sum()

    def kl(p: torch.Tensor, q: torch.Tensor) -> float:
        return float(0.5 * ((p - q) * (p.log() - q.log())).sum())

    beta = brentq(lambda w: kl(pair(0, 1, w), pair(1, 0, w)) - close, 1e-6, 1.0, xtol=1e-12)
    gamma = brentq(lambda w: kl(pair(2, 3, w), pair(3, 2, w)) - apart, 1e-6, 1.0, xtol=1e-12)
    per_rect = [pair(0, 1, beta), pair(1, 0, beta), pair(2, 3, gamma), pair(3, 2, gamma)]
    far = min(kl(per_rect[i], per_rect[j]) for i, j in ((0, 2), (0, 3), (1, 2), (1, 3)))
    assert far > 4, far
    maps = torch.stack([per_rect[i] for i in rect.reshape(-1).tolist()]).float()[None]
    classes = torch.tensor([0, 0, 1, 2])[rect]
    return maps, rect, classes
