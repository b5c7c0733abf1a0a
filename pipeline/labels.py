"""Proposals -> the uint16 label map the Parquet sink stores, at the image's own size.

The upsampling and argmax are core's :func:`diffseg_core.merge.labels_from_proposals`,
which already works in bands of rows, so a 10,000 x 10,000 image never holds K
full-size maps.
"""
from __future__ import annotations

import numpy as np
import torch

from diffseg_core.merge import labels_from_proposals

#: Segment ids must fit the 16-bit PNG the sink writes.
MAX_SEGMENTS = 1 << 16


def labels_at_size(proposals: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """uint16 (H, W) argmax labels of (K, R, R) proposals upsampled bilinearly to size=(H, W)."""
    k = proposals.shape[0]
    if k > MAX_SEGMENTS:
        raise ValueError(f"{k} proposals do not fit a 16-bit label map")
    return labels_from_proposals(proposals, size).to(torch.int32).cpu().numpy().astype(np.uint16)
