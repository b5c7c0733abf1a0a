"""Clean label maps: small regions absorbed, disconnected parts split into their own segments.

Both work on the host (numpy and ``scipy.ndimage.label``) on a label map at the image's own size,
after the argmax, in this order:

1. :func:`absorb_small_regions` (``min_region_area``): every connected region of one label
   smaller than the area -- an island inside another segment, or a hole in one -- joins the
   label it shares the longest border with (segment-anything's ``remove_small_regions``,
   done for every label of the map at once), smallest regions first, until none is left;
2. :func:`split_connected` (``connected``): every connected region becomes its own segment.

Connectivity is 4 (edge-sharing pixels) everywhere: the regions measured, the borders they
join over and the regions split. A 4-connected region is connected under 8-connectivity too,
and a region joined to a 4-neighbour stays one 4-connected region, so after both steps every
segment is one connected region of at least ``min_region_area`` pixels (unless the whole
image is smaller than that: one region with no neighbour stays as it is).

Segment ids stay 0..n-1 without gaps, in the order of the input's ids (a split segment's parts
in raster order of their first pixel).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["CONNECTIVITY", "absorb_small_regions", "clean_label_map", "cleaning_problem", "split_connected"]

#: scipy's structuring element for 4-connectivity.
CONNECTIVITY = ndimage.generate_binary_structure(2, 1)


def cleaning_problem(min_region_area: object, connected: object) -> str | None:
    """One sentence saying what is wrong with the clean-up options, or None."""
    if isinstance(min_region_area, bool) or not isinstance(min_region_area, int) or min_region_area < 0:
        return f"min_region_area must be a whole number of pixels, 0 or more (0 = off), not {min_region_area!r}"
    if not isinstance(connected, bool):
        return f"connected must be true or false, not {connected!r}"
    return None


def _components(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Every connected region of every label numbered 1..n (int32 map, n), in label order."""
    out = np.zeros(labels.shape, dtype=np.int32)
    count = 0
    for value in np.unique(labels):
        regions, n = ndimage.label(labels == value, structure=CONNECTIVITY)
        out[regions > 0] = regions[regions > 0] + count
        count += n
    return out, count


def absorb_small_regions(labels: np.ndarray, min_region_area: int) -> np.ndarray:
    """``labels`` (H, W) with every 4-connected region of one label smaller than ``min_region_area``
    pixels joined to the neighbouring label it shares most border pixels with (ties: the
    smaller id). Values keep their meaning; some ids may vanish (the caller renumbers)."""
    labels = np.array(labels, copy=True)
    if min_region_area <= 1 or labels.size == 0:
        return labels
    while True:
        regions, count = _components(labels)
        if count <= 1:
            return labels
        areas = np.bincount(regions.ravel(), minlength=count + 1)
        small = [r for r in np.argsort(areas[1:], kind="stable") + 1 if areas[r] < min_region_area]
        if not small:
            return labels
        boxes = ndimage.find_objects(regions)
        changed = False
        for r in small:
            ys, xs = boxes[r - 1]
            top, left = max(ys.start - 1, 0), max(xs.start - 1, 0)
            window = (slice(top, ys.stop + 1), slice(left, xs.stop + 1))
            inside = regions[window] == r
            if not inside.any():  # already absorbed into a region joined earlier in this pass
                continue
            own = labels[window][inside][0]
            ring = ndimage.binary_dilation(inside, structure=CONNECTIVITY) & ~inside
            around = labels[window][ring]
            around = around[around != own]
            if around.size == 0:
                continue
            values, counts = np.unique(around, return_counts=True)
            labels[window][inside] = values[np.argmax(counts)]
            regions[window][inside] = 0  # stale from now on: this pass leaves it alone
            changed = True
        if not changed:
            return labels


def split_connected(labels: np.ndarray) -> np.ndarray:
    """Every 4-connected region of ``labels`` (H, W) its own segment: int64 ids 0..n-1."""
    regions, _ = _components(labels)
    return compact(regions)


def compact(labels: np.ndarray) -> np.ndarray:
    """Renumber a non-negative label map to 0..n-1 without gaps, keeping the order of its values (int64)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def clean_label_map(labels: np.ndarray, min_region_area: int = 0, connected: bool = False) -> np.ndarray:
    """min-area absorption, then the connected split; int64 ids 0..n-1 without gaps.
    With neither option the map comes back unchanged (as int64)."""
    labels = np.asarray(labels)
    if min_region_area > 1:
        labels = absorb_small_regions(labels, min_region_area)
    if connected:
        return split_connected(labels)
    if min_region_area > 1:
        return compact(labels)
    return labels.astype(np.int64, copy=False)
