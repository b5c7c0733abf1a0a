"""Bilinear resizing as matrix products.

torch's ``F.interpolate`` is slow on CPU for many single-channel maps and for
few-channel large outputs; the same half-pixel-centre rule (``align_corners=False``,
as Keras' ``UpSampling2D`` and ``tf.image.resize`` in the reference) written as
two small matrix products is exact up to float rounding and fast everywhere.
"""
from __future__ import annotations

import torch


def bilinear_matrix(out_size: int, in_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(out_size, in_size) matrix of 1-D bilinear interpolation with half-pixel centres.

    Source coordinate ``(i + 0.5) * in/out - 0.5``, clamped at the borders, as
    torch's ``align_corners=False`` and TensorFlow's ``half_pixel_centers``.
    Built on ``device`` itself: copying a host tensor to an accelerator would make
    the host wait for it.
    """
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).clamp_min(0)
    lo = src.floor().long().clamp_max(in_size - 1)
    hi = (lo + 1).clamp_max(in_size - 1)
    frac = (src - lo).clamp(0, 1)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64, device=device)
    rows = torch.arange(out_size, device=device)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix.to(torch.float32)


def resize_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (..., h, w) maps to (..., H, W) bilinearly (half-pixel centres)."""
    height, width = size
    rows = bilinear_matrix(height, maps.shape[-2], maps.device)
    cols = bilinear_matrix(width, maps.shape[-1], maps.device)
    return rows @ maps @ cols.T
