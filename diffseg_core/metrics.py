"""Evaluation metrics of the DiffSeg paper: per-image Hungarian matching.

Protocol (the one behind the paper's COCO-Stuff-27 / Cityscapes numbers, and
what google/diffseg's ``hungarian_matching`` + ``benchmarks.ipynb`` compute):

1. Per image, build the confusion matrix ``hist[c, k]`` = number of labelled
   pixels (``gt != ignore_index``) with ground-truth class ``c`` and predicted
   segment id ``k``. Predicted ids are arbitrary segment indices, not classes.
2. Match segments to classes one-to-one with
   ``scipy.optimize.linear_sum_assignment(hist, maximize=True)`` (maximise the
   number of matched pixels). Each matched segment takes its class.
3. Per class ``c`` (``k`` = the segment matched to ``c``, if any):
   ``TP[c] = hist[c, k]``; ``FP[c] = labelled pixels of k whose class is not c``;
   ``FN[c] = pixels of class c not in k``. Pixels of *unmatched* segments
   (only possible when there are more segments than classes) therefore count
   as FN of their true class and never as FP.
4. TP/FP/FN are summed over the dataset. ``pixel accuracy = sum(TP) /
   labelled pixels``; ``mIoU = mean over classes of TP / (TP + FP + FN)``.
   A class with ``TP + FP + FN == 0`` over the whole dataset (never in the
   ground truth and never predicted) is **excluded** from the mean (its IoU is
   NaN, as the reference's ``np.nanmean`` does).

Notes that follow from matching exactly like the reference:

* The matrix is laid out as the reference lays it out (classes as rows,
  ``max(num_classes, max_id + 1)`` segment columns), so ties are broken the
  same way. When the image has at most ``num_classes`` segments, *every*
  segment is matched, possibly to a class it does not overlap (a class absent
  from the image): its pixels then count as FP of that class, which can pull
  a class that never appears in any ground truth into the mean with IoU 0.
  This is the reference's behaviour and part of the published numbers.
* Segment ids above ``_DENSE_ID_LIMIT`` are first renumbered (order kept)
  so that arbitrary large ids cannot blow up the matrix.

Class maps (``matching="none"``): predictions that already are classes (a
vocabulary's class maps) are scored directly, with no matching, as
open-vocabulary segmentation is: ``TP[c]`` = pixels predicted ``c`` whose class
is ``c``, ``FP[c]`` = labelled pixels predicted ``c`` of another class,
``FN[c]`` = pixels of class ``c`` predicted otherwise. A prediction outside
``[0, num_classes)`` (255, "unknown") is no class: its pixels count as FN of
their true class only.

No I/O, no Ray: the accumulator ships between workers as plain data via
:meth:`SegmentationMetrics.to_dict` / :meth:`SegmentationMetrics.from_dict`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["MATCHING", "SegmentationMetrics", "hungarian_match"]

#: "hungarian": predictions are segment ids, matched per image (the paper);
#: "none": predictions are classes (a vocabulary's class maps), scored as they are.
MATCHING = ("hungarian", "none")

# Largest segment id used directly as a matrix column (as the reference does);
# larger ids are renumbered densely first.
_DENSE_ID_LIMIT = 1024


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array or torch tensor to an integer numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")
    return x


def _validate(
    pred: Any, gt: Any, num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Check one (pred, gt) pair; return flat int64 arrays of the labelled pixels."""
    p = _to_numpy(pred, "pred")
    g = _to_numpy(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    if p.ndim != 2:
        raise ValueError(f"expected one image of shape (H, W), got shape {p.shape}; feed images one at a time")
    if p.size == 0:
        raise ValueError(f"empty image: shape {p.shape}")
    p = p.astype(np.int64, copy=False).ravel()
    g = g.astype(np.int64, copy=False).ravel()
    if p.min() < 0:
        raise ValueError(f"pred has negative segment ids (min {int(p.min())}); ids must be >= 0")
    bad = (g != ignore_index) & ((g < 0) | (g >= num_classes))
    if bad.any():
        raise ValueError(
            f"gt has values outside [0, {num_classes}) other than ignore_index={ignore_index}: "
            f"{np.unique(g[bad])[:10].tolist()}"
        )
    labelled = g != ignore_index
    return p[labelled], g[labelled]


def _match_flat(
    p: np.ndarray, g: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Match labelled pixels ``p`` (segment ids) to ``g`` (classes).

    Returns ``(hist, classes, cols, segment_ids)``: the (C, P) confusion
    matrix, the matched (class, column) pairs, and the original id of each column.
    """
    if p.size and p.max() >= _DENSE_ID_LIMIT:
        segment_ids, p = np.unique(p, return_inverse=True)
    else:
        segment_ids = None
    n_cols = max(num_classes, int(p.max()) + 1 if p.size else 0)
    hist = np.bincount(g * n_cols + p, minlength=num_classes * n_cols).reshape(num_classes, n_cols)
    classes, cols = linear_sum_assignment(hist, maximize=True)
    if segment_ids is None:
        segment_ids = np.arange(n_cols)
    else:  # columns beyond the renumbered ids are empty padding
        segment_ids = np.concatenate([segment_ids, np.full(n_cols - segment_ids.size, -1)])
    return hist, classes, cols, segment_ids


def hungarian_match(pred: Any, gt: Any, num_classes: int, ignore_index: int = -1) -> dict[int, int]:
    """One-to-one matching of predicted segment ids to ground-truth classes.

    Maximises the number of labelled pixels (``gt != ignore_index``) on which
    the matched class equals the ground truth (``linear_sum_assignment`` on the
    class x segment confusion matrix). Returns ``{segment_id: class}`` for the
    matched segments that occur in ``pred`` on at least one labelled pixel;
    segments left out are unmatched (their pixels count as FN).
    """
    _check_config(num_classes, ignore_index)
    p, g = _validate(pred, gt, num_classes, ignore_index)
    return _mapping(*_match_flat(p, g, num_classes))


def _mapping(hist: np.ndarray, classes: np.ndarray, cols: np.ndarray, segment_ids: np.ndarray) -> dict[int, int]:
    """{segment id: class} for matched columns holding at least one labelled pixel."""
    present = hist.sum(axis=0) > 0
    return dict(sorted((int(segment_ids[k]), int(c)) for c, k in zip(classes, cols) if present[k]))


def _score_classes(
    p: np.ndarray, g: np.ndarray, num_classes: int
) -> tuple[dict[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """TP/FP/FN of predicted classes ``p`` against ``g`` (labelled pixels), no matching.

    Predictions outside [0, num_classes) are "unknown": FN of the true class, never FP.
    """
    known = p < num_classes
    hist = np.bincount(g[known] * num_classes + p[known], minlength=num_classes * num_classes)
    hist = hist.reshape(num_classes, num_classes)  # [true class, predicted class]
    tp = np.diagonal(hist).astype(np.int64)
    fp = hist.sum(axis=0) - tp
    fn = np.bincount(g, minlength=num_classes).astype(np.int64) - tp
    mapping = {int(c): int(c) for c in np.unique(p[known])}
    return mapping, tp, fp.astype(np.int64), fn


def _check_config(num_classes: int, ignore_index: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index={ignore_index} collides with a class id in [0, {num_classes})")


def _iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = tp + fp + fn
    out = np.full(tp.shape, np.nan, dtype=np.float64)
    np.divide(tp, denom, out=out, where=denom > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


class SegmentationMetrics:
    """Dataset-level accumulator of the paper's protocol (see module docstring).

    Feed it image by image with :meth:`update`; combine workers' accumulators
    with :meth:`merge`. Scores are computed from the summed TP/FP/FN, so they
    are *not* the average of per-image scores.

    Attributes: ``tp``, ``fp``, ``fn`` (``np.int64`` arrays of length
    ``num_classes``), ``labelled_pixels`` (pixels with ``gt != ignore_index``;
    always equals ``tp.sum() + fn.sum()``), ``num_images``.
    """

    def __init__(self, num_classes: int, ignore_index: int = -1, matching: str = "hungarian") -> None:
        _check_config(num_classes, ignore_index)
        if matching not in MATCHING:
            raise ValueError(f"matching must be one of {', '.join(MATCHING)}, got {matching!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matching = matching
        self.tp = np.zeros(self.num_classes, dtype=np.int64)
        self.fp = np.zeros(self.num_classes, dtype=np.int64)
        self.fn = np.zeros(self.num_classes, dtype=np.int64)
        self.labelled_pixels = 0
        self.num_images = 0

    def update(self, pred: Any, gt: Any) -> dict[str, Any]:
        """Add one image: ``pred`` (H, W) segment ids >= 0, ``gt`` (H, W) classes.

        Both numpy arrays or torch tensors of an integer dtype; ``gt`` values are
        in ``[0, num_classes)`` or ``ignore_index``. Raises ``ValueError`` on a
        shape mismatch, a non-2-D or empty image, a non-integer dtype, negative
        segment ids or out-of-range gt values (nothing is added then).

        Returns this image's result: ``mapping`` ({segment id: class} of the
        matched segments), ``tp``/``fp``/``fn`` (int64 arrays), ``labelled_pixels``,
        ``pixel_accuracy`` and ``miou`` of this image alone (NaN if it has no
        labelled pixel).
        """
        p, g = _validate(pred, gt, self.num_classes, self.ignore_index)
        if self.matching == "none":
            mapping, tp, fp, fn = _score_classes(p, g, self.num_classes)
        else:
            hist, classes, cols, segment_ids = _match_flat(p, g, self.num_classes)
            matched = hist[classes, cols]
            tp = np.zeros(self.num_classes, dtype=np.int64)
            fp = np.zeros(self.num_classes, dtype=np.int64)
            tp[classes] = matched
            fp[classes] = hist[:, cols].sum(axis=0) - matched
            fn = hist.sum(axis=1) - tp
            mapping = _mapping(hist, classes, cols, segment_ids)
        labelled = int(p.size)

        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.labelled_pixels += labelled
        self.num_images += 1
        return {
            "mapping": mapping,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "labelled_pixels": labelled,
            "pixel_accuracy": float(tp.sum() / labelled) if labelled else float("nan"),
            "miou": _nanmean(_iou(tp, fp, fn)),
        }

    def merge(self, other: "SegmentationMetrics") -> "SegmentationMetrics":
        """Add ``other``'s counts into this accumulator (in place); returns ``self``."""
        if not isinstance(other, SegmentationMetrics):
            raise TypeError(f"can only merge a SegmentationMetrics, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge: num_classes {self.num_classes} vs {other.num_classes}")
        if other.ignore_index != self.ignore_index:
            raise ValueError(f"cannot merge: ignore_index {self.ignore_index} vs {other.ignore_index}")
        if other.matching != self.matching:
            raise ValueError(f"cannot merge: matching {self.matching} vs {other.matching}")
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.labelled_pixels += other.labelled_pixels
        self.num_images += other.num_images
        return self

    def iou_per_class(self) -> np.ndarray:
        """TP / (TP + FP + FN) per class; NaN for classes with no TP, FP or FN."""
        return _iou(self.tp, self.fp, self.fn)

    def miou(self) -> float:
        """Mean IoU over classes with TP + FP + FN > 0 (NaN if there is none)."""
        return _nanmean(self.iou_per_class())

    def pixel_accuracy(self) -> float:
        """Summed TP / labelled pixels (NaN before any labelled pixel)."""
        if self.labelled_pixels == 0:
            return float("nan")
        return float(self.tp.sum() / self.labelled_pixels)

    def summary(self) -> dict[str, Any]:
        """``{"pixel_accuracy", "miou", "num_images", "labelled_pixels"}``."""
        return {
            "pixel_accuracy": self.pixel_accuracy(),
            "miou": self.miou(),
            "num_images": self.num_images,
            "labelled_pixels": self.labelled_pixels,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able state (ints and lists of ints)."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "matching": self.matching,
            "tp": self.tp.tolist(),
            "fp": self.fp.tolist(),
            "fn": self.fn.tolist(),
            "labelled_pixels": int(self.labelled_pixels),
            "num_images": int(self.num_images),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegmentationMetrics":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on malformed data."""
        try:
            m = cls(d["num_classes"], d.get("ignore_index", -1), d.get("matching", "hungarian"))
            for key in ("tp", "fp", "fn"):
                arr = np.asarray(d[key])
                if arr.shape != (m.num_classes,) or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
                    raise ValueError(f"{key!r} must be {m.num_classes} non-negative ints")
                setattr(m, key, arr.astype(np.int64))
            m.labelled_pixels = int(d["labelled_pixels"])
            m.num_images = int(d["num_images"])
        except KeyError as e:
            raise ValueError(f"missing key {e.args[0]!r} in SegmentationMetrics dict") from None
        if m.labelled_pixels != int(m.tp.sum() + m.fn.sum()) or m.num_images < 0:
            raise ValueError("inconsistent SegmentationMetrics dict: labelled_pixels != sum(tp) + sum(fn)")
        return m

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"SegmentationMetrics(num_classes={self.num_classes}, matching={self.matching!r}, "
            f"num_images={s['num_images']}, "
            f"pixel_accuracy={s['pixel_accuracy']:.4f}, miou={s['miou']:.4f})"
        )
