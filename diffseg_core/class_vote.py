"""From class attention and a label map to one class per segment, and a class map.

The official DiffSeg rule (``get_semantics`` of google/diffseg), batched and at
any output size:

1. `combine_class_attention`: the per-resolution class attention
   ``{r: (B, r*r, C)}`` is upsampled bilinearly to the finest resolution R and
   added with weights proportional to r (as the self-attention aggregation),
   giving (B, C, R, R); every pixel is still a distribution over the C classes.
2. `vote_classes`: each class's map is upsampled bilinearly to the label map's
   size and L2-normalised over the image (so a class that gets little
   attention everywhere can still win where it gets the most); every pixel
   votes for its best class; a segment takes
   * ``"majority"``: the class most of its pixels vote for (official rule;
     the reference takes the *median* class index of the votes, which is not a
     majority: we count);
   * ``"mean"``: the class with the largest normalised mass inside it (the
     reference's other option).
   Ties go to the class listed first in the vocabulary.  A segment's
   ``score`` is the share of its pixels that vote for its class; a segment whose
   score is under ``threshold`` gets class -1, "unknown", never a guess.

The full-size maps are never held: the L2 norms come in closed form from the
R x R maps and the votes are counted in bands of rows.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from diffseg_core.aggregate import Weights, _normalised_weights
from diffseg_core.interpolation import bilinear_matrix, resize_bilinear
from diffseg_core.merge import NMS_BAND_ELEMENTS, argmax_first
from diffseg_core.vocabulary import DEFAULT_CLASS_THRESHOLD, VOTING, check_voting

__all__ = [
    "DEFAULT_CLASS_THRESHOLD",
    "UNKNOWN",
    "VOTING",
    "SegmentClasses",
    "check_voting",
    "combine_class_attention",
    "vote_classes",
]

#: Value of an unknown class in a class map (8-bit PNG).
UNKNOWN = 255


@dataclass
class SegmentClasses:
    """Per segment id 0..K-1: ``classes`` int64 (-1 = unknown) and ``scores`` float32 in [0, 1]."""

    classes: np.ndarray
    scores: np.ndarray

    def class_map(self, labels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (H, W): each pixel's segment's class, `UNKNOWN` (255) where it has none."""
        lut = np.where(self.classes >= 0, self.classes, UNKNOWN).astype(np.uint8)
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        return lut[labels]


def combine_class_attention(class_attention: Mapping[int, torch.Tensor], weights: Weights = None) -> torch.Tensor:
    """``{r: (B, r*r, C)}`` -> float32 (B, C, R, R): bilinear to the finest R, weighted sum.

    Default weights are proportional to r, as the self-attention aggregation's.
    """
    if not class_attention:
        raise ValueError("class attention: no resolutions given")
    resolutions = sorted(class_attention, reverse=True)
    shapes = {r: tuple(m.shape) for r, m in class_attention.items()}
    batches = {s[0] for s in shapes.values()}
    classes = {s[-1] for s in shapes.values()}
    for r, s in shapes.items():
        if len(s) != 3 or s[1] != r * r:
            raise ValueError(f"class attention at resolution {r}: expected (B, {r * r}, C), got {s}")
    if len(batches) != 1 or len(classes) != 1:
        raise ValueError(f"class attention: resolutions disagree on batch or classes: {shapes}")
    R = resolutions[0]
    w = _normalised_weights(resolutions, weights)
    (batch,), (num_classes,) = batches, classes
    out = None
    for r in resolutions:
        m = class_attention[r].float().transpose(1, 2).reshape(batch, num_classes, r, r)
        level = (m if r == R else resize_bilinear(m, (R, R))) * w[r]
        out = level if out is None else out.add_(level)
    return out


def vote_classes(
    class_maps: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    *,
    num_segments: int | None = None,
    voting: str = "majority",
    threshold: float = DEFAULT_CLASS_THRESHOLD,
) -> SegmentClasses:
    """One class per segment of ``labels`` from one image's (C, h, w) class maps.

    ``labels``: (H, W) segment ids 0..K-1 (K = ``num_segments`` or the largest
    id + 1); the class maps are upsampled to (H, W).  See the module docstring
    for the rule.  Ids with no pixel get class -1 and score 0.
    """
    check_voting(voting, threshold)
    if class_maps.ndim != 3 or class_maps.shape[0] == 0:
        raise ValueError(f"class maps: expected a non-empty (C, h, w) tensor, got {tuple(class_maps.shape)}")
    if not isinstance(labels, torch.Tensor):  # a read-only array (Ray's, a frombuffer) is copied, not aliased
        array = np.asarray(labels)
        labels = torch.from_numpy(array if array.flags.writeable else array.copy())
    if labels.ndim != 2 or labels.numel() == 0:
        raise ValueError(f"labels: expected a non-empty (H, W) map, got {tuple(labels.shape)}")
    device = class_maps.device
    labels = labels.to(device=device, dtype=torch.long)
    if num_segments is None:  # checked here; with num_segments given (no device sync), bincount checks
        if int(labels.min()) < 0:
            raise ValueError("labels: segment ids must be non-negative")
        k = int(labels.max()) + 1
    else:
        k = int(num_segments)
    c, h, w = class_maps.shape
    height, width = labels.shape

    maps = class_maps.float()
    rows = bilinear_matrix(height, h, device)  # (H, h)
    cols = bilinear_matrix(width, w, device)  # (W, w)
    # ||rows @ M @ cols^T||^2 = sum((rows^T rows @ M) * (M @ cols^T cols)): the norm of the
    # full-size map from the small one. Upsampling is linear, so normalise before it.
    norms = ((rows.T @ rows @ maps) * (maps @ (cols.T @ cols))).sum((1, 2)).clamp_min(1e-30).sqrt()
    along_width = (maps / norms[:, None, None]) @ cols.T  # (C, h, W)

    votes = torch.zeros(k * c, dtype=torch.long, device=device)
    mass = torch.zeros(k, c, dtype=torch.float64, device=device) if voting == "mean" else None
    band = max(1, NMS_BAND_ELEMENTS // (c * width))
    for top in range(0, height, band):
        scores = rows[top : top + band] @ along_width  # (C, b, W)
        segment = labels[top : top + band].reshape(-1)
        best = argmax_first(scores).reshape(-1)
        votes += torch.bincount(segment * c + best, minlength=k * c)
        if mass is not None:
            mass.index_add_(0, segment, scores.reshape(c, -1).T.double())
    if votes.numel() != k * c:
        raise ValueError(f"labels: ids beyond num_segments={k}")
    votes = votes.view(k, c)
    area = votes.sum(1)
    winner = (votes if mass is None else mass).argmax(1)  # first maximum: the earlier class
    share = votes.gather(1, winner[:, None])[:, 0].double() / area.clamp_min(1)
    known = (area > 0) & (share >= float(threshold))
    classes = torch.where(known, winner, torch.full_like(winner, -1))
    return SegmentClasses(
        classes=classes.cpu().numpy().astype(np.int64),
        scores=share.float().cpu().numpy(),
    )

