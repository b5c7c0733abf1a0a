"""One unit of the search: a group of settings x a chunk of cached images -> TP/FP/FN per setting and fold.

A group is the settings that share an aggregate and an anchor grid (same
weights, same num_points); within it every threshold schedule and refine flag
comes from one :func:`diffseg_core.sweep.sweep_proposals` pass per image.
Settings whose proposals come out identical (schedules that stop merging
early, thresholds that select the same rows) share one NMS and one scoring
(keyed by a hash of the proposals' bytes). Settings with ``boundaries="pamr"``
refine those proposals exactly as ``DiffSeg.label_maps`` does (upsampled to the
model's input size, PAMR with the cached input pixels, then NMS at the label
frame); one chain of PAMR iterations serves every iteration count asked. A group
of normalized cuts (``grouping="ncut"``) shares the aggregate (attention affinity)
and the cached encoder features (features affinity): one cut per threshold x
affinity, then the same NMS, PAMR and scoring. Scores
are the paper's protocol (``SegmentationMetrics``: per-image Hungarian
matching, TP/FP/FN summed).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from diffseg_core import boundaries as pamr_module
from diffseg_core.aggregate import aggregate_attention
from diffseg_core.grouping import ncut_proposals
from diffseg_core.merge import compact_labels, labels_from_proposals
from diffseg_core.metrics import SegmentationMetrics
from diffseg_core.sweep import sweep_proposals
from pipeline.tune.cache import load_features, load_maps, load_pixels


#: PAMR's (iterations, dilations), or None: boundaries off.
BoundarySpec = tuple[int, tuple[int, ...]] | None


@dataclass(frozen=True)
class Group:
    """Settings sharing weights and anchor grid: (schedule, refine, boundaries) triples, in the order
    results come back; with ``grouping="ncut"``, (threshold, affinity, boundaries) triples (and
    num_points unused)."""

    weights: tuple[float, ...]  # finest first
    num_points: int
    members: tuple[tuple[Any, Any, BoundarySpec], ...]
    grouping: str = "kl-merge"


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
    specs: dict[tuple[Any, Any], list[BoundarySpec]] = {}
    for a, b, spec in group.members:
        specs.setdefault((a, b), []).append(spec)
    scored = 0
    with torch.inference_mode():
        for path, target, fold in zip(paths, targets, folds):
            pixels = load_pixels(path) if any(spec for _, _, spec in group.members) else None
            seen: dict[tuple[bytes, BoundarySpec], np.ndarray] = {}
            for a, b, proposals in _proposals(path, group, list(specs)):
                wanted = specs[a, b]
                digest = hashlib.sha1(proposals.numpy().tobytes()).digest()
                missing = [spec for spec in wanted if (digest, spec) not in seen]
                for spec, labels in _label_maps(proposals, target.shape, pixels, missing):
                    one = SegmentationMetrics(num_classes).update(labels.numpy(), target)
                    seen[digest, spec] = np.stack([one["tp"], one["fp"], one["fn"]])
                    scored += 1
                for spec in wanted:
                    counts[index[a, b, spec], fold] += seen[digest, spec]
            images[fold] += 1
            labelled[fold] += int((target != -1).sum())
    return {"counts": counts, "images": images, "labelled": labelled, "scored": scored,
            "seconds": time.perf_counter() - start}


def _proposals(path: str, group: Group, keys: Sequence[tuple[Any, Any]]) -> Iterator[tuple[Any, Any, torch.Tensor]]:
    """(key, key, (K, r, r) proposals) of one cached image for each of the group's proposal keys:
    (schedule, refine) from one sweep of the KL merge, or (threshold, affinity) of each cut."""
    if group.grouping == "kl-merge":
        aggregate = aggregate_attention(load_maps(path), list(group.weights))
        schedules = list(dict.fromkeys(s for s, _ in keys))
        flags = sorted({r for _, r in keys})
        wanted = set(keys)
        for schedule, refine, proposals in sweep_proposals(aggregate, group.num_points, schedules, flags):
            if (schedule, refine) in wanted:
                yield schedule, refine, proposals
        return
    affinities = {a for _, a in keys}
    aggregate = aggregate_attention(load_maps(path), list(group.weights)) if "attention" in affinities else None
    features = load_features(path) if "features" in affinities else None
    for threshold, affinity in keys:
        yield threshold, affinity, ncut_proposals(aggregate, features, threshold=threshold, affinity=affinity)[0]


def _label_maps(proposals: torch.Tensor, size: tuple[int, int], pixels: torch.Tensor | None,
                specs: Sequence[BoundarySpec]) -> list[tuple[BoundarySpec, torch.Tensor]]:
    """The label map of these (K, R, R) proposals at ``size`` for each boundary spec: exactly
    DiffSeg.label_maps (ids without gaps; the Hungarian matching breaks ties among empty columns
    differently without them), PAMR at the pixels' size when on."""
    out = []
    if None in specs:
        out.append((None, compact_labels(labels_from_proposals(proposals, size), proposals.shape[0])))
    by_dilations: dict[tuple[int, ...], list[int]] = {}
    for spec in specs:
        if spec is not None:
            by_dilations.setdefault(spec[1], []).append(spec[0])
    for dilations, counts in by_dilations.items():
        assert pixels is not None
        masks = pamr_module.proposal_distribution(proposals, tuple(pixels.shape[-2:]))
        for n, refined in pamr_module.pamr_steps(pixels, masks, counts, dilations):
            out.append(((n, dilations), compact_labels(labels_from_proposals(refined[0], size), proposals.shape[0])))
    return out
