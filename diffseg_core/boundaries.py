"""Image-guided refinement of DiffSeg's soft proposal maps: PAMR.

Pixel-adaptive mask refinement (Araslanov & Roth, "Single-Stage Semantic
Segmentation from Image Labels", CVPR 2020). For every pixel i and its 8
neighbours j in a 3 x 3 window dilated by each d of ``dilations`` (replicate
padding at the borders), the affinity kernel is

    k(i, j) = mean over channels c of  -|I_i,c - I_j,c| / (SIGMA_SCALE * sigma_i,c)

with sigma_i,c the standard deviation of channel c over the pixel's whole
neighbourhood (the 3 x 3 windows of every dilation, stacked). A softmax over
all 8 * len(dilations) neighbours gives a(i, j); the masks are then iterated,
``M_i <- sum_j a(i, j) M_j``. The kernel depends only on the image's local
contrast (dividing by sigma makes it invariant to the image's scale), so
labels flow along regions of similar colour and stop at edges.

``SIGMA_SCALE`` (0.1) is the authors' released code's temperature. The masks
refined here are DiffSeg's proposals upsampled to the working size, normalised
per pixel into a distribution over the K proposals (:func:`proposal_distribution`):
the iteration averages neighbours' distributions, and normalising first makes each
neighbour count by its affinity alone, not by how much attention mass it holds;
the argmax of a pixel is unchanged by it.

Everything is batched torch on the tensors' device; the neighbour sum is taken
one neighbour at a time, so memory stays at a few copies of (B, K, H, W).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from diffseg_core.parameters import BOUNDARY_MODES, boundaries_problem  # torch-free: the driver checks them

__all__ = ["BOUNDARY_MODES", "DEFAULT_DILATIONS", "DEFAULT_ITERATIONS", "SIGMA_SCALE", "boundaries_problem",
           "neighbour_offsets", "pamr", "pamr_affinity", "pamr_steps", "proposal_distribution"]

#: The paper's dilations and iterations.
DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
DEFAULT_ITERATIONS = 10
#: Temperature of the kernel, in units of the local standard deviation (the authors' code).
SIGMA_SCALE = 0.1
_EPS = 1e-8


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(dy, dx) of the 8 neighbours of a 3 x 3 window, for each dilation in turn."""
    ring = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    return [(dy * d, dx * d) for d in dilations for dy, dx in ring]


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """(..., H, W) view of a padded tensor: at (y, x) the value at (y + dy, x + dx), replicated at borders."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def _replicate(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Replicate padding of the last two axes of (B, C, H, W) by ``pad`` (any pad, even past the size)."""
    height, width = x.shape[-2:]
    rows = torch.arange(-pad, height + pad, device=x.device).clamp(0, height - 1)
    cols = torch.arange(-pad, width + pad, device=x.device).clamp(0, width - 1)
    return x[..., rows, :][..., cols]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = DEFAULT_DILATIONS) -> torch.Tensor:
    """(B, P, H, W) affinities a(i, j) over the P = 8 * len(dilations) neighbours of every pixel
    (they sum to 1 over P), from a (B, C, H, W) float image."""
    if image.ndim != 4:
        raise ValueError(f"image: expected (B, C, H, W), got {tuple(image.shape)}")
    image = image.float()
    height, width = image.shape[-2:]
    pad = max(dilations)
    padded = _replicate(image, pad)
    offsets = neighbour_offsets(dilations)
    # sigma_i: std of each channel over the pixel's neighbourhood, every dilation's 3 x 3 window stacked
    window = [(0, 0)] * len(dilations) + offsets  # each window's centre counted once per dilation
    n = len(window)
    total = torch.zeros_like(image)
    squares = torch.zeros_like(image)
    for dy, dx in window:
        v = _shifted(padded, pad, dy, dx, height, width)
        total += v
        squares += v * v
    mean = total / n
    variance = ((squares - n * mean * mean) / (n - 1)).clamp_min(0)  # unbiased, as torch.std
    scale = SIGMA_SCALE * variance.sqrt() + _EPS
    kernel = torch.empty((image.shape[0], len(offsets), height, width), dtype=image.dtype, device=image.device)
    for p, (dy, dx) in enumerate(offsets):
        kernel[:, p] = (-(image - _shifted(padded, pad, dy, dx, height, width)).abs() / scale).mean(1)
    return torch.softmax(kernel, dim=1)


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    iterations: int = DEFAULT_ITERATIONS,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> torch.Tensor:
    """Refine (B, K, H, W) soft masks with the affinities of the (B, C, H, W) image: ``iterations``
    times ``M_i <- sum_j a(i, j) M_j``. Returns float (B, K, H, W) on the masks' device."""
    return next(pamr_steps(image, masks, [iterations], dilations))[1]


def pamr_steps(
    image: torch.Tensor,
    masks: torch.Tensor,
    counts: Sequence[int],
    dilations: Sequence[int] = DEFAULT_DILATIONS,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(n, masks after n iterations) for each n of ``counts``, in increasing order: one chain of
    iterations and one affinity for every count (``diffseg tune`` scores 5, 10 and 20 at the cost of 20)."""
    if masks.ndim != 4 or image.ndim != 4 or image.shape[0] != masks.shape[0] or image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and masks {tuple(masks.shape)}: expected (B, C, H, W) and "
                         "(B, K, H, W) of the same batch and size")
    wanted = sorted({int(n) for n in counts})
    for n in wanted:
        problem = boundaries_problem("pamr", n, dilations)
        if problem:
            raise ValueError(problem)
    affinity = pamr_affinity(image.to(masks.device), dilations)
    offsets = neighbour_offsets(dilations)
    height, width = masks.shape[-2:]
    pad = max(dilations)
    masks = masks.float()
    done = 0
    for n in wanted:
        for _ in range(n - done):
            padded = _replicate(masks, pad)
            out = torch.zeros_like(masks)
            for p, (dy, dx) in enumerate(offsets):
                out.addcmul_(affinity[:, p : p + 1], _shifted(padded, pad, dy, dx, height, width))
            masks = out
        done = n
        yield n, masks


def proposal_distribution(proposals: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, R, R) proposals -> (1, K, H, W): upsampled bilinearly to ``size`` (as NMS does) and
    normalised per pixel over K, a distribution whose argmax is NMS's."""
    up = F.interpolate(proposals.float()[None], size=tuple(size), mode="bilinear", align_corners=False)
    return up / up.sum(1, keepdim=True).clamp_min(1e-30)
