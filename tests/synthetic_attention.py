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
