"""The search on Ray: one task per group of settings (same weights and anchor grid) x chunk of images.

Each task reads its images' cached attention from disk (the cache folder must
be visible to the workers: a local Ray, or a shared filesystem) and gets their
ground truth through the object store, put once per chunk. The driver sums
the tasks' TP/FP/FN into one (settings, folds, 3, classes) array; a progress
bar counts settings x images scored.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.tune.grid import Setting, weight_values
from pipeline.tune.score import Group, score_chunk


@dataclass
class SearchResult:
    counts: np.ndarray  # int64 (settings, folds, 3, classes): TP, FP, FN
    images: np.ndarray  # (folds,)
    labelled: np.ndarray  # (folds,)
    seconds: float
    tasks: int
    scored: int  # distinct label maps scored (identical proposals share one)


def group_settings(settings: Sequence[Setting], resolutions: Sequence[int]) -> list[tuple[Group, list[int]]]:
    """Settings grouped by (grouping, weights, num_points): each group with the indices of its members
    in ``settings``."""
    groups: dict[tuple[str, str, int], list[int]] = {}
    for i, s in enumerate(settings):
        groups.setdefault((s.grouping, s.weights, s.num_points), []).append(i)
    out = []
    for (grouping, weights, num_points), members in groups.items():
        keys = [(s.ncut_threshold, s.ncut_affinity) if s.is_ncut else (s.thresholds, s.refine)
                for s in (settings[i] for i in members)]
        group = Group(tuple(weight_values(weights, resolutions)), num_points,
                      tuple((*key, settings[i].boundary_spec) for key, i in zip(keys, members)), grouping)
        out.append((group, members))
    return out


class SearchSession:
    """One Ray for every stage of a search: ``search(settings)`` scores them on the session's images."""

    def __init__(self, paths: Sequence[str], targets: Sequence[np.ndarray], folds: Sequence[int], num_folds: int,
                 num_classes: int, resolutions: Sequence[int], *, chunk_size: int | None = None,
                 progress: bool = True) -> None:
        self.args = (paths, targets, folds, num_folds, num_classes, resolutions)
        self.chunk_size, self.progress = chunk_size, progress
        self.ray: Any = None
        self.own_ray = False

    def __enter__(self) -> "SearchSession":
        from pipeline.ray_connect import init_ray

        self.ray, self.own_ray = init_ray(None, log_to_driver=True)  # label's: a local Ray, its token note dropped
        return self

    def __exit__(self, *exc: Any) -> None:
        from pipeline.ray_connect import shutdown_ray

        shutdown_ray(self.ray, self.own_ray)

    def search(self, settings: Sequence[Setting], desc: str = "score settings x images") -> SearchResult:
        from tqdm.auto import tqdm

        return _search(self.ray, tqdm, settings, *self.args, self.chunk_size, self.progress, desc)


def run_search(
    settings: Sequence[Setting],
    paths: Sequence[str],
    targets: Sequence[np.ndarray],
    folds: Sequence[int],
    num_folds: int,
    num_classes: int,
    resolutions: Sequence[int],
    *,
    chunk_size: int | None = None,
    progress: bool = True,
) -> SearchResult:
    """Score every setting on every image on Ray; see the module docstring."""
    with SearchSession(paths, targets, folds, num_folds, num_classes, resolutions, chunk_size=chunk_size,
                       progress=progress) as session:
        return session.search(settings)


def _search(ray: Any, tqdm: Any, settings: Sequence[Setting], paths: Sequence[str], targets: Sequence[np.ndarray],
            folds: Sequence[int], num_folds: int, num_classes: int, resolutions: Sequence[int],
            chunk_size: int | None, progress: bool, desc: str = "score settings x images") -> SearchResult:
    start = time.perf_counter()
    groups = group_settings(settings, resolutions)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if chunk_size is None:  # about two tasks per CPU, so a slow one does not hold the end back
        chunks_wanted = max(1, math.ceil(2 * cpus / len(groups)))
        chunk_size = max(1, math.ceil(len(paths) / chunks_wanted))
    chunks = [range(i, min(i + chunk_size, len(paths))) for i in range(0, len(paths), chunk_size)]
    target_refs = [ray.put([targets[i] for i in c]) for c in chunks]
    task = ray.remote(num_cpus=1)(score_chunk)
    pending: dict[Any, tuple[list[int], int]] = {}
    for group, members in groups:
        for c, ref in zip(chunks, target_refs):
            obj = task.remote([paths[i] for i in c], ref, [folds[i] for i in c], group, num_classes, num_folds)
            pending[obj] = (members, len(c))
    counts = np.zeros((len(settings), num_folds, 3, num_classes), dtype=np.int64)
    images = np.zeros(num_folds, dtype=np.int64)
    labelled = np.zeros(num_folds, dtype=np.int64)
    scored = 0
    tasks = len(pending)
    bar = tqdm(total=len(settings) * len(paths), desc=desc, unit="", disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for obj in done:
                members, n = pending.pop(obj)
                part = ray.get(obj)
                counts[members] += part["counts"]
                scored += part["scored"]
                if members[0] == groups[0][1][0]:  # image counts: from one group only
                    images += part["images"]
                    labelled += part["labelled"]
                bar.update(len(members) * n)
    finally:
        bar.close()
        for obj in pending:
            ray.cancel(obj)
    return SearchResult(counts, images, labelled, time.perf_counter() - start, tasks, scored)
