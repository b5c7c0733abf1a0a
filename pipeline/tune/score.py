"""One unit of the search: a group of settings x a chunk of cached images -> TP/FP/FN per setting and fold.

A group is the settings that share an aggregate and an anchor grid (same
weights, same num_points); within it every threshold schedule and refine flag
comes from one :func:`diffseg_core.sweep.sweep_proposals` pass per image.
Settings whose proposals come out identical (schedules that stop merging
early, thresholds that select the same rows) share one NMS and one scoring
(keyed by a hash of the proposals' bytes). Scores are the paper's protocol
(``SegmentationMetrics``: per-image Hungarian matching, TP/FP/FN summed).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from diffseg_core.aggregate import aggregate_attention
from diffseg_core.merge import compact_labels, labels_from_proposals
from diffseg_core.metrics import SegmentationMetrics
from diffseg_core.sweep import sweep_proposals
from pipeline.tune.cache import load_maps


@dataclass(frozen=True)
class Group:
    """Settings sharing weights and anchor grid: (schedule, refine) pairs, in the order results come back."""

    weights: tuple[float, ...]  # finest first
    num_points: int
    members: tuple[tuple[tuple[float, ...], bool], ...]


def score_chunk(paths: Sequence[str], targets: Sequence[np.ndarray], folds: Sequence[int], group: Group,
                num_classes: int, num_folds: int, threads: int | None = 1) -> dict[str, Any]:
    """Score every member of ``group`` on these images (cached attention files, targets at their frames).

    Returns ``counts`` int64 (members, folds, 3, classes) holding TP, FP, FN,
    ``images`` per fold, ``labelled`` pixels per fold, ``scored`` (distinct
    label maps scored) and ``seconds``.
    """
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    index = {m: i for i, m in enumerate(group.members)}
    counts = np.zeros((len(group.members), num_folds, 3, num_classes), dtype=np.int64)
    images = np.zeros(num_folds, dtype=np.int64)
    labelled = np.zeros(num_folds, dtype=np.int64)
    schedules = list(dict.fromkeys(s for s, _ in group.members))
    flags = sorted({r for _, r in group.members})
    scored = 0
    with torch.inference_mode():
        for path, target, fold in zip(paths, targets, folds):
            aggregate = aggregate_attention(load_maps(path), list(group.weights))
            seen: dict[bytes, np.ndarray] = {}
            for schedule, refine, proposals in sweep_proposals(aggregate, group.num_points, schedules, flags):
                member = index.get((schedule, refine))
                if member is None:
                    continue
                digest = hashlib.sha1(proposals.numpy().tobytes()).digest()
                result = seen.get(digest)
                if result is None:
                    # exactly DiffSeg.label_maps (what `diffseg label` writes): ids without gaps; the
                    # Hungarian matching breaks ties among empty columns differently without it
                    labels = compact_labels(labels_from_proposals(proposals, target.shape), proposals.shape[0])
                    one = SegmentationMetrics(num_classes).update(labels.numpy(), target)
                    result = seen[digest] = np.stack([one["tp"], one["fp"], one["fn"]])
                    scored += 1
                counts[member, fold] += result
            images[fold] += 1
            labelled[fold] += int((target != -1).sum())
    return {"counts": counts, "images": images, "labelled": labelled, "scored": scored,
            "seconds": time.perf_counter() - start}
