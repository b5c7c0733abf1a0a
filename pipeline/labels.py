"""Proposals -> a label map at the image's own size, with bounded memory.

diffseg_core.merge.labels_from_proposals upsamples all K proposals to (H, W) at
once: K x H x W floats, 8 GB for 20 proposals on a 10,000 x 10,000 image. Past
a budget we compute the same bilinear upsampling (align_corners=False) as two
small interpolation matrices, a strip of rows at a time.
"""
from __future__ import annotations

import numpy as np
import torch

# Elements of the (K, H, W) upsampled stack computed at once (256 MB of float32).
MAX_ELEMENTS = 1 << 26


def labels_at_size(proposals: torch.Tensor, size: tuple[int, int], max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """uint16 (H, W) argmax labels of (K, R, R) proposals upsampled bilinearly to size=(H, W)."""
    from diffseg_core.merge import labels_from_proposals

    height, width = size
    k = proposals.shape[0]
    if k > 65536:
        raise ValueError(f"{k} proposals do not fit a 16-bit label map")
    if k * height * width <= max_elements:
        return labels_from_proposals(proposals, (height, width)).to(torch.int32).cpu().numpy().astype(np.uint16)
    p = proposals.float()
    wy = interpolation_matrix(height, p.shape[1], p.device)
    wx = interpolation_matrix(width, p.shape[2], p.device)
    out = np.empty((height, width), dtype=np.uint16)
    rows = max(1, max_elements // (k * width))
    for top in range(0, height, rows):
        strip = torch.einsum("hr,krs->khs", wy[top : top + rows], p) @ wx.T  # (K, h, W)
        out[top : top + strip.shape[1]] = strip.argmax(0).to(torch.int32).cpu().numpy()
    return out


def interpolation_matrix(out_size: int, in_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(out, in) weights of 1-D linear interpolation as torch's align_corners=False computes it."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = torch.clamp(i0 + 1, max=in_size - 1)
    w1 = src - i0
    w0 = 1 - w1
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    m.index_put_((torch.arange(out_size), i0), w0, accumulate=True)
    m.index_put_((torch.arange(out_size), i1), w1, accumulate=True)
    return m.float().to(device)
