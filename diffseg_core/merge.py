"""Steps 5-6 of DiffSeg: iterative KL merging of attention maps, and NMS.

Helpers for :mod:`diffseg_core.segmentor`, which reads top to bottom.

Where the reference is weak, this is not:
- symmetric KL is two matrix products (``0.5*(H(p) + H(q) - p.log q - q.log p)``
  with ``H(x) = sum x log x``), never an anchors x maps x R x R tensor;
- float32 with logs of ``max(x, EPS)``, so maps holding zeros or tiny values
  give large but finite distances instead of NaN;
- iteration 0 runs for a whole batch at once.

On a CPU the work goes one image at a time (each image's working set stays in
cache, and host round trips are free).  On an accelerator every step is batched
and asks the host nothing it could decide itself: no ``int()``/``bool()`` on a
device tensor, no per-image copy back.  The greedy merging of iterations 1..
is sequential by nature, so it runs on the host: one small boolean matrix per
batch and iteration crosses over (:func:`merge_proposals_batch`).
"""
from __future__ import annotations

import numpy as np
import torch

from diffseg_core.interpolation import bilinear_matrix

#: Floor inside the logarithms. Far below any probability a softmax over at
#: most ~10^5 keys gives in float32 except exact zeros, so it changes nothing
#: for ordinary maps and keeps zeros finite.
EPS = 1e-12

#: Largest K x rows x W block NMS materialises at once (16M floats = 64 MB).
NMS_BAND_ELEMENTS = 1 << 24


def runs_batched(device: torch.device) -> bool:
    """Whether work on ``device`` is batched and decided on the device (accelerators, where a
    round trip to the host stalls the device) or per image with host decisions (CPU, where
    round trips are free and one image's working set stays in cache)."""
    return device.type != "cpu"


def entropy_terms(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``log(max(x, EPS))`` and ``sum(x * log x)`` over the last axis.

    ``out`` (shaped like x) receives the logarithms, computed in place.
    When ``x`` holds no zeros its values are used as they are (even below EPS);
    otherwise every value is floored at EPS.
    """
    if runs_batched(x.device):
        # The same rule, decided on the device (no host round trip): max(x, 0) is x.
        floor = torch.where(x.amin() > 0, 0.0, EPS).to(x.dtype)
        log_x = torch.maximum(x, floor, out=out) if out is not None else torch.maximum(x, floor)
        log_x.log_()
    elif float(x.amin()) > 0:  # the usual case: one pass instead of clamp + log
        log_x = torch.log(x, out=out) if out is not None else x.log()
    else:
        log_x = torch.clamp_min(x, EPS, out=out) if out is not None else x.clamp_min(EPS)
        log_x.log_()
    return log_x, torch.einsum("...k,...k->...", x, log_x)


def symmetric_kl(
    p: torch.Tensor,
    q: torch.Tensor,
    p_terms: tuple[torch.Tensor, torch.Tensor] | None = None,
    q_terms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pairwise ``0.5*KL(p||q) + 0.5*KL(q||p)`` for (..., M, K) and (..., N, K) -> (..., M, N).

    Precomputed :func:`entropy_terms` may be passed to avoid recomputing logs.
    """
    log_p, h_p = p_terms if p_terms is not None else entropy_terms(p)
    log_q, h_q = q_terms if q_terms is not None else entropy_terms(q)
    cross = p @ log_q.transpose(-1, -2)
    cross += log_p @ q.transpose(-1, -2)
    return 0.5 * (h_p[..., :, None] + h_q[..., None, :] - cross)


def merge_with_anchors(
    aggregate: torch.Tensor, anchors: torch.Tensor, tau: float, log_buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Iteration 0, batched: each anchor's proposal is the mean of every row within tau of it.

    Args:
        aggregate: (B, N, K) rows of the aggregated attention (N = K = R*R).
        anchors: (A,) row indices of the anchor grid.
        tau: KL threshold (strict ``<``, as the reference).
        log_buffer: optional scratch tensor shaped like aggregate for its logarithms.

    Returns:
        (B, A, K) proposals.
    """
    log_agg, h_agg = entropy_terms(aggregate, out=log_buffer)
    if runs_batched(aggregate.device):
        # Batched, every selection averaged (no de-duplication: finding the distinct
        # selections needs the host; the extra products are cheap on an accelerator).
        anchor_terms = (log_agg[:, anchors], h_agg[:, anchors])
        distance = symmetric_kl(aggregate[:, anchors], aggregate, anchor_terms, (log_agg, h_agg))
        selections = (distance < tau).to(aggregate.dtype)
        return (selections @ aggregate) / selections.sum(-1, keepdim=True)
    proposals = aggregate.new_empty((aggregate.shape[0], len(anchors), aggregate.shape[-1]))
    # One image at a time: 2-D matrix products with a transposed operand are
    # faster than batched ones on CPU, and the work per image is large anyway.
    for b in range(aggregate.shape[0]):
        distance = anchor_distances(aggregate[b], (log_agg[b], h_agg[b]), anchors)
        proposals[b] = means_within(aggregate[b], distance, tau)
    return proposals


def anchor_distances(
    rows: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor], anchors: torch.Tensor
) -> torch.Tensor:
    """(A, N) symmetric KL from each anchor row to every row of one image's (N, K) aggregate.

    ``terms``: the rows' :func:`entropy_terms`. It does not depend on tau, so a
    sweep over thresholds computes it once (diffseg_core.sweep).
    """
    log_rows, h_rows = terms
    return symmetric_kl(rows[anchors], rows, (log_rows[anchors], h_rows[anchors]), terms)


def means_within(rows: torch.Tensor, distance: torch.Tensor, tau: float) -> torch.Tensor:
    """(A, K): for each anchor, the mean of the (N, K) rows whose distance to it is < tau."""
    # Anchors inside one uniform region often select the very same rows:
    # average each distinct selection once.
    selections, which = unique_rows(distance < tau)
    selections = selections.to(rows.dtype)
    means = selections @ rows
    # An anchor is always within tau of itself, so no count is zero.
    means /= selections.sum(-1, keepdim=True)
    return means[which]


def unique_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of a (M, N) bool matrix, and for each row the index of its distinct row.

    As ``torch.unique(mask, dim=0, return_inverse=True)`` (in another order),
    but grouped by a random projection of each row and then verified exactly:
    one matrix-vector product instead of a sort of whole rows.
    """
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(mask.shape[1], dtype=torch.float64, generator=generator).to(mask.device)
    _, which = torch.unique(mask.to(torch.float64) @ weights, return_inverse=True)
    rows = torch.arange(len(mask), device=mask.device)
    first = torch.full((int(which.max()) + 1,), len(mask), dtype=torch.long, device=mask.device)
    first.scatter_reduce_(0, which, rows, reduce="amin")
    distinct = mask[first]
    if bool((distinct[which] != mask).any()):  # a hash collision: never seen, but stay exact
        distinct, which = torch.unique(mask, dim=0, return_inverse=True)
    return distinct, which


def merge_proposals(proposals: torch.Tensor, tau: float) -> torch.Tensor:
    """Iterations 1.., one image: greedy merging of (P, K) proposals -> (P', K).

    Walk the proposals in order; each one not yet matched becomes an anchor,
    takes the mean of *all* proposals (matched or not) within tau of it, and
    marks them matched.
    """
    close = (symmetric_kl(proposals, proposals) < tau).cpu().numpy()
    matched = np.zeros(len(close), dtype=bool)
    groups: list[np.ndarray] = []
    for i in range(len(close)):
        if matched[i]:
            continue
        members = close[i].copy()
        members[i] = True
        matched |= members
        groups.append(members)
    selection = torch.from_numpy(np.stack(groups)).to(device=proposals.device, dtype=proposals.dtype)
    return (selection @ proposals) / selection.sum(-1, keepdim=True)


def merge_proposals_batch(
    proposals: torch.Tensor, counts: np.ndarray, tau: float
) -> tuple[torch.Tensor, np.ndarray]:
    """Iterations 1.., a whole batch: :func:`merge_proposals` for every image at once.

    Args:
        proposals: (B, P, K); image b's proposals are rows ``:counts[b]``, the
            rows after them are padding and are ignored.
        counts: (B,) int, proposals per image.
        tau: KL threshold.

    Returns:
        (B, P', K) merged proposals padded with zeros, and their counts per image.

    The distances are computed on the proposals' device; the greedy walk, which
    is sequential, runs on the host over the whole batch at once, so one
    (B, P, P) boolean matrix goes to the host and one (B, P', P) selection back.
    """
    batch, size, _ = proposals.shape
    counts = np.asarray(counts, dtype=np.int64)
    close = (symmetric_kl(proposals, proposals) < tau).cpu().numpy()
    valid = np.arange(size)[None, :] < counts[:, None]
    close &= valid[:, None, :]  # padding is never a member
    matched = ~valid  # ... and never an anchor
    anchor = np.zeros((batch, size), dtype=bool)
    for i in range(size):
        take = ~matched[:, i]
        if take.any():
            anchor[take, i] = True
            matched[take] |= close[take, i]
    new_counts = anchor.sum(1)
    selection = np.zeros((batch, max(int(new_counts.max()), 1), size), dtype=bool)
    for b in range(batch):
        rows = np.flatnonzero(anchor[b])
        selection[b, : len(rows)] = close[b, rows]
        selection[b, np.arange(len(rows)), rows] = True  # an anchor is in its own group
    selection_t = torch.from_numpy(selection).to(device=proposals.device, dtype=proposals.dtype, non_blocking=True)
    merged = (selection_t @ proposals) / selection_t.sum(-1, keepdim=True).clamp_min(1)
    return merged, new_counts


def labels_from_proposals(proposals: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """NMS: upsample (K, R, R) proposals bilinearly to output_size and take the per-pixel argmax.

    Bilinear with half-pixel centres (``align_corners=False``, as the
    reference's Keras ``UpSampling2D``), done as two small matrix products and
    in bands of rows, so a 12-megapixel image never holds K full-size maps.

    Returns int64 (H, W) with values in 0..K-1 (the first maximum wins ties).
    Nothing here waits for the device: the matrices are built where the proposals are.
    """
    if proposals.ndim != 3 or proposals.shape[0] == 0:
        raise ValueError(f"proposals: expected a non-empty (K, R, R) tensor, got {tuple(proposals.shape)}")
    height, width = _checked_size(output_size)
    k, rows, cols = proposals.shape
    device = proposals.device
    if k == 1:
        return torch.zeros((height, width), dtype=torch.long, device=device)
    along_width = proposals.float() @ bilinear_matrix(width, cols, device).T  # (K, rows, W)
    along_height = bilinear_matrix(height, rows, device)  # (H, rows)
    band = max(1, NMS_BAND_ELEMENTS // (k * width))
    labels = torch.empty((height, width), dtype=torch.long, device=device)
    for top in range(0, height, band):
        labels[top : top + band] = argmax_first(along_height[top : top + band] @ along_width)
    return labels


def argmax_first(scores: torch.Tensor) -> torch.Tensor:
    """argmax over axis 0 of (K, H, W), first maximum on ties.

    On a CPU a running maximum: torch's argmax over the outer axis of a
    contiguous tensor is strided and ~10x slower there.  Elsewhere one argmax
    (torch documents the first maximum to win), not 3K small kernels.
    """
    if runs_batched(scores.device):
        return scores.argmax(0)
    best = scores[0].clone()
    index = torch.zeros(scores.shape[1:], dtype=torch.long, device=scores.device)
    for i in range(1, scores.shape[0]):
        better = scores[i] > best
        best = torch.where(better, scores[i], best)
        index.masked_fill_(better, i)
    return index


def compact_labels(labels: torch.Tensor, num_labels: int | None = None) -> torch.Tensor:
    """Renumber a non-negative label map's values to 0..n-1, keeping their order.

    ``num_labels``: a bound on the values (K proposals); with it nothing waits
    for the device (``bincount`` must first read the maximum back to the host).
    """
    flat = labels.reshape(-1)
    if num_labels is None:
        present = torch.bincount(flat) > 0
    else:
        present = torch.zeros(num_labels, dtype=torch.bool, device=labels.device).scatter_(0, flat, True)
    remap = present.cumsum(0) - 1
    return remap[labels]


def _checked_size(output_size: tuple[int, int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in output_size)
    except (TypeError, ValueError):
        raise ValueError(f"output_size must be (height, width), got {output_size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return height, width
