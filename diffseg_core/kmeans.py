"""K-means on aggregated attention rows: DiffSeg's optional refinement and the
paper's two baselines, K-Means-C (constant k = 6) and K-Means-S (k = number of
ground-truth classes in each image).

Plain Lloyd iterations in torch (batched distance by matrix product), so it
runs where the attention is, CPU or GPU, with no scikit-learn.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from diffseg_core.aggregate import aggregate_attention
from diffseg_core.merge import compact_labels, labels_from_proposals


def lloyd(
    rows: torch.Tensor, centers: torch.Tensor, max_iter: int = 300, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's k-means from given initial centres.

    Args:
        rows: (N, D) points. centers: (K, D) initial centres.
        max_iter, tol: as scikit-learn: stop when the total squared centre shift
            is at most ``tol * mean per-feature variance`` or labels stop changing.

    Returns:
        (labels (N,), centers (K', D), inertia): empty clusters are dropped and
        labels renumbered 0..K'-1 in the order of the surviving centres;
        inertia is the sum of squared distances to the nearest centre.
    """
    rows = rows.float()
    centers = centers.float().clone()
    threshold = tol * float(rows.var(0, unbiased=False).mean())
    row_sq = (rows * rows).sum(1, keepdim=True)
    labels = None
    for _ in range(max_iter):
        new_labels = _nearest(rows, row_sq, centers)
        one_hot = torch.nn.functional.one_hot(new_labels, len(centers)).to(rows.dtype)
        counts = one_hot.sum(0)
        sums = one_hot.T @ rows
        occupied = counts > 0
        new_centers = centers.clone()
        new_centers[occupied] = sums[occupied] / counts[occupied, None]
        shift = float(((new_centers - centers) ** 2).sum())
        converged = labels is not None and bool((new_labels == labels).all())
        centers, labels = new_centers, new_labels
        if converged or shift <= threshold:
            break
    labels = _nearest(rows, row_sq, centers)
    inertia = float(((rows - centers[labels]) ** 2).sum())
    kept = torch.unique(labels)
    remap = torch.full((len(centers),), -1, dtype=torch.long, device=rows.device)
    remap[kept] = torch.arange(len(kept), device=rows.device)
    return remap[labels], centers[kept], inertia


def kmeans_plus_plus(rows: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): (N, D) -> (k, D) centres."""
    n = rows.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    dist = ((rows - rows[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(dist.sum())
        if total <= 0:  # every row already coincides with a centre
            nxt = int(torch.randint(n, (1,), generator=generator))
        else:
            nxt = int(torch.multinomial((dist / total).cpu(), 1, generator=generator))
        chosen.append(nxt)
        dist = torch.minimum(dist, ((rows - rows[nxt]) ** 2).sum(1))
    return rows[chosen].clone()


def refine_proposals(aggregate_rows: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """DiffSeg's ``refine=True``: k-means over the (N, K) aggregate rows started at the (P, K) proposals.

    Returns the means of the non-empty clusters, (P', K).
    """
    _, centers, _ = lloyd(aggregate_rows, proposals)
    return centers


def kmeans_constant(
    maps: Mapping[int, torch.Tensor],
    k: int = 6,
    output_size: tuple[int, int] | None = None,
    seed: int = 0,
    n_init: int = 10,
) -> torch.Tensor:
    """K-Means-C baseline: k-means with a constant k on each image's aggregated attention rows."""
    return kmeans_per_image(maps, k, output_size=output_size, seed=seed, n_init=n_init)


def kmeans_per_image(
    maps: Mapping[int, torch.Tensor],
    k: int | Sequence[int],
    output_size: tuple[int, int] | None = None,
    seed: int = 0,
    n_init: int = 10,
) -> torch.Tensor:
    """K-Means-S baseline: k-means with k given per image (the number of ground-truth classes).

    Centroids are attention maps like DiffSeg's proposals, so labels come from
    the same NMS (bilinear upsample of the centroids + argmax) at output_size
    (default 8R x 8R, the image size of a Stable Diffusion latent of side R).
    Like scikit-learn's classic KMeans, the best of ``n_init`` k-means++ runs
    (lowest inertia) is kept.

    Returns int64 (B, H, W), labels renumbered 0..n-1.
    """
    aggregate = aggregate_attention(maps)
    batch, n, _ = aggregate.shape
    ks = [k] * batch if isinstance(k, int) else list(k)
    if len(ks) != batch:
        raise ValueError(f"kmeans_per_image: got {len(ks)} values of k for a batch of {batch}")
    if any(int(v) < 1 or int(v) > n for v in ks):
        raise ValueError(f"kmeans_per_image: every k must be in 1..{n}, got {ks}")
    if n_init < 1:
        raise ValueError(f"kmeans_per_image: n_init must be >= 1, got {n_init}")
    R = int(round(n**0.5))
    size = output_size or (8 * R, 8 * R)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batch):
        rows = aggregate[b]
        runs = (lloyd(rows, kmeans_plus_plus(rows, int(ks[b]), generator)) for _ in range(n_init))
        _, centers, _ = min(runs, key=lambda run: run[2])
        out.append(compact_labels(labels_from_proposals(centers.view(-1, R, R), size)))
    return torch.stack(out)


def _nearest(rows: torch.Tensor, row_sq: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    dist = row_sq - 2 * rows @ centers.T + (centers * centers).sum(1)[None]
    return dist.argmin(1)
