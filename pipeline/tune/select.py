"""Choosing a setting from the search's TP/FP/FN, and an honest estimate of how good the choice is.

In-sample: every setting scored on the whole sample (TP/FP/FN summed over all
images, then mIoU and pixel accuracy, as ``diffseg eval``); the best is the
setting to use. With a small sample the best in-sample score flatters it, so
the same choice is also made k times, each time on all folds but one, and
each choice is scored on the fold it did not see: summed over the k held-out
folds (every image scored once, by a setting chosen without it), that is the
score to expect on new images from the whole procedure (k-fold cross-validation).

Ties (common: many settings give the same labels) go to the setting listed
first, and the default setting is listed first, so a tie with the default keeps it.

Not every scored setting may be chosen everywhere: PAMR is scored only on the
best few plain settings (``top``), and a fold may choose only the PAMR variants
of the plain settings that were best on its own training folds (``eligible``),
so its held-out images play no part in what it can choose.

The guard against a small sample: the default involves no choice, so its score on
the sample is already an honest one. When the k-fold estimate of the search is
below it, choosing on this sample does not carry over to new images (the best
in-sample setting won by chance), and the selection keeps the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from diffseg_core.metrics import SegmentationMetrics


@dataclass
class Score:
    miou: float
    pixel_accuracy: float
    images: int

    def as_dict(self) -> dict[str, Any]:
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy, "images": self.images}


@dataclass
class Selection:
    ranking: list[tuple[int, Score]]  # (setting index, in-sample score), best first
    best: int
    held_out: Score  # the k-fold estimate for the selection procedure
    default_score: Score | None  # the default setting on the same images (None: it cannot run on the model)
    folds: list[dict[str, Any]] = field(default_factory=list)  # per fold: chosen, train and test scores
    kept_default: bool = False  # the search's held-out estimate fell below the default: best is the default


def score(tp_fp_fn: np.ndarray, images: int) -> Score:
    """mIoU and pixel accuracy of summed (3, classes) TP/FP/FN, by SegmentationMetrics' definitions."""
    tp, fp, fn = (np.asarray(a, dtype=np.int64) for a in tp_fp_fn)
    m = SegmentationMetrics.from_dict({"num_classes": len(tp), "tp": tp, "fp": fp, "fn": fn,
                                       "labelled_pixels": int(tp.sum() + fn.sum()), "num_images": int(images)})
    return Score(m.miou(), m.pixel_accuracy(), int(images))


def rank(counts: np.ndarray, images: int) -> list[tuple[int, Score]]:
    """Settings by (mIoU, pixel accuracy), best first; ties keep the settings' order. ``counts``: (settings, 3, C)."""
    scores = [(i, score(counts[i], images)) for i in range(len(counts))]
    return sorted(scores, key=lambda item: (-_key(item[1].miou), -_key(item[1].pixel_accuracy), item[0]))


def top(counts: np.ndarray, images: np.ndarray, n: int, among: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """The best ``n`` settings of ``among`` in-sample, and the best ``n`` on each fold's training folds."""
    k = counts.shape[1]
    among = list(among)

    def best(folds: list[int]) -> list[int]:
        ranked = rank(counts[among][:, folds].sum(1), int(images[folds].sum()))
        return [among[i] for i, _ in ranked[:n]]

    return best(list(range(k))), [best([g for g in range(k) if g != f]) for f in range(k)]


def select(counts: np.ndarray, images: np.ndarray, default: int | None,
           eligible: np.ndarray | None = None) -> Selection:
    """In-sample ranking and k-fold estimate from (settings, folds, 3, classes) counts.

    ``eligible``: bool (folds + 1, settings), which settings each fold may choose (the last row: the
    in-sample choice); None: every setting everywhere.
    """
    k = counts.shape[1]
    if eligible is None:
        eligible = np.ones((k + 1, counts.shape[0]), dtype=bool)
    ranking = rank(counts.sum(1), int(images.sum()))
    held = np.zeros(counts.shape[2:], dtype=np.int64)
    folds = []
    for f in range(k):
        train = [g for g in range(k) if g != f]
        chosen, train_score = next((i, sc) for i, sc in rank(counts[:, train].sum(1), int(images[train].sum()))
                                   if eligible[f, i])
        held += counts[chosen, f]
        folds.append({"fold": f, "chosen": chosen, "train": train_score.as_dict(),
                      "test": score(counts[chosen, f], int(images[f])).as_dict()})
    held_out = score(held, int(images.sum()))
    default_score = score(counts[default].sum(0), int(images.sum())) if default is not None else None
    best, kept_default = next(i for i, _ in ranking if eligible[k, i]), False
    if (default_score is not None and eligible[k, default] and best != default
            and _key(held_out.miou) < _key(default_score.miou)):
        best, kept_default = default, True
    return Selection(ranking, best, held_out, default_score, folds, kept_default)


def _key(v: float) -> float:
    return -1.0 if v != v else v  # NaN sorts last
