"""Label map -> what goes into a row: PNG bytes, per-segment area/bbox, optional COCO RLE.

Segment ids in the stored label map are consecutive (0..n-1, in the order of
the merged proposals): proposals that win no pixel are dropped, so
``num_segments`` is the number of segments actually present.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

RLE_TYPE = "struct<size: list<int32>, counts: string>"


def compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber a label map's values to 0..n-1 keeping their order; returns (uint16 map, n)."""
    labels = np.asarray(labels)
    present = np.flatnonzero(np.bincount(labels.ravel().astype(np.int64)))
    if len(present) > 65536:
        raise ValueError(f"{len(present)} segments do not fit a 16-bit label map")
    if len(present) and present[-1] == len(present) - 1:
        return labels.astype(np.uint16, copy=False), len(present)
    lut = np.zeros(int(present[-1]) + 1 if len(present) else 1, dtype=np.uint16)
    lut[present] = np.arange(len(present), dtype=np.uint16)
    return lut[labels], len(present)


def png_bytes(labels: np.ndarray, num_segments: int) -> bytes:
    """8-bit greyscale PNG when ids fit in a byte, else 16-bit greyscale."""
    buf = io.BytesIO()
    if num_segments <= 256:
        Image.fromarray(labels.astype(np.uint8, copy=False), mode="L").save(buf, format="PNG", compress_level=6)
    else:
        Image.fromarray(labels.astype(np.uint16, copy=False)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of png_bytes (for readers and tests): (H, W) integer label map."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img).astype(np.int64)


def segments(labels: np.ndarray, num_segments: int, rle: bool) -> list[dict[str, Any]]:
    """Per segment: id, area (pixels), bbox [x, y, w, h] and, when asked, COCO RLE."""
    areas = np.bincount(labels.ravel(), minlength=num_segments)
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False) + 1, max_label=num_segments)
    out = []
    for seg_id in range(num_segments):
        box = boxes[seg_id]
        if box is None:  # pragma: no cover - compact() leaves no empty ids
            continue
        ys, xs = box
        seg: dict[str, Any] = {
            "id": seg_id,
            "area": int(areas[seg_id]),
            "bbox": [int(xs.start), int(ys.start), int(xs.stop - xs.start), int(ys.stop - ys.start)],
            "rle": coco_rle(labels == seg_id) if rle else None,
        }
        out.append(seg)
    return out


def coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a boolean mask (pycocotools), counts as a string."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = encoded["counts"]
    return {"size": [int(v) for v in encoded["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def encode_label(labels: np.ndarray, rle: bool) -> tuple[bytes, int, list[dict[str, Any]]]:
    """(PNG bytes, num_segments, segments) for one raw label map."""
    compacted, n = compact(labels)
    return png_bytes(compacted, n), n, segments(compacted, n, rle)


def class_png(class_map: np.ndarray) -> bytes:
    """8-bit greyscale PNG of a class map (vocabulary index per pixel, 255 = unknown)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(class_map, dtype=np.uint8), mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def name_segments(segs: list[dict[str, Any]], classes: Any, scores: Any, names: Any) -> None:
    """Give each segment (in id order) its ``class`` (a name, or None: unknown) and ``class_score``, in place."""
    if len(classes) != len(segs) or len(scores) != len(segs):
        raise ValueError(f"{len(segs)} segments but {len(classes)} classes and {len(scores)} scores")
    for seg, c, score in zip(segs, classes, scores):
        c = int(c)
        seg["class"] = str(names[c]) if 0 <= c < len(names) else None
        seg["class_score"] = float(score)
