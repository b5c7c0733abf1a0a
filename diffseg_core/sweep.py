"""Many DiffSeg settings on one image's aggregate, sharing the work they have in common.

What ``DiffSeg(kl_threshold=schedule, num_points=n, refine=...).proposals_from_aggregate``
gives for each schedule, computed once per shared part instead of once per setting:

- the logarithms and entropies of the aggregate rows, and the anchor-to-row
  distances (two of the three large matrix products) do not depend on tau:
  once per (aggregate, num_points);
- iteration 0 depends only on the first threshold: once per distinct tau_0;
- schedules that start alike share their merged prefix: (1.1, 1.0) is computed
  on the way to (1.1, 1.0, 0.9), so every iteration count of a schedule costs
  one merge step more than the shorter one, not a fresh run.

The same functions (diffseg_core.merge) do the arithmetic, on the same operands,
so each result is what DiffSeg itself computes for that setting
(tests/test_sweep.py checks them label for label). Results come depth-first, so
only one path of the prefix tree is held at a time.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch

from diffseg_core.aggregate import aggregate_side, anchor_grid
from diffseg_core.kmeans import refine_proposals
from diffseg_core.merge import anchor_distances, entropy_terms, means_within, merge_proposals

Schedule = tuple[float, ...]


def sweep_proposals(
    aggregate: torch.Tensor,
    num_points: int,
    schedules: Iterable[Sequence[float]],
    refine: Iterable[bool] = (False,),
) -> Iterator[tuple[Schedule, bool, torch.Tensor]]:
    """Yield ``(schedule, refine, proposals (K, R, R))`` for every schedule x refine flag.

    Args:
        aggregate: one image's aggregated attention, (N, N) or (1, N, N), N = R*R.
        num_points: side of the anchor grid.
        schedules: kl thresholds, one tuple per setting (its length is the
            number of iterations). Repeats are yielded once.
        refine: which refine flags to yield for each schedule.
    """
    rows = aggregate[0] if aggregate.ndim == 3 and aggregate.shape[0] == 1 else aggregate
    if rows.ndim != 2 or rows.shape[0] != rows.shape[1] or rows.shape[0] == 0:
        raise ValueError(f"aggregate: expected one image's (N, N) or (1, N, N), got {tuple(aggregate.shape)}")
    R = aggregate_side(rows)
    rows = rows.float()
    flags = sorted(set(bool(f) for f in refine))
    trie = _prefix_tree(schedules)
    if not trie or not flags:
        return
    anchors = anchor_grid(R, num_points).to(rows.device)
    log_rows, h_rows = entropy_terms(rows[None])  # batched, exactly as DiffSeg computes them
    terms = (log_rows[0], h_rows[0])
    distance = anchor_distances(rows, terms, anchors)
    del terms, log_rows, h_rows  # the logarithms are as large as the aggregate; iterations 1.. do not need them
    for tau0, child in trie.items():
        first = means_within(rows, distance, tau0)
        yield from _walk((tau0,), first, child, rows, flags, R)


class _Node(dict):
    """Children by next threshold; ``end`` marks a prefix that is itself a requested schedule."""

    end = False


def _prefix_tree(schedules: Iterable[Sequence[float]]) -> _Node:
    root = _Node()
    for schedule in schedules:
        values = [float(v) for v in schedule]
        if not values or any(not math.isfinite(v) or v <= 0 for v in values):
            raise ValueError(f"kl thresholds must be a non-empty sequence of positive numbers, got {list(schedule)}")
        node = root
        for v in values:
            node = node.setdefault(v, _Node())
        node.end = True
    return root


def _walk(
    prefix: Schedule, proposals: torch.Tensor, node: _Node, rows: torch.Tensor, flags: list[bool], R: int
) -> Iterator[tuple[Schedule, bool, torch.Tensor]]:
    if node.end:
        for flag in flags:
            final = refine_proposals(rows, proposals) if flag else proposals
            yield prefix, flag, final.reshape(-1, R, R)
    for tau, child in node.items():
        yield from _walk(prefix + (tau,), merge_proposals(proposals, tau), child, rows, flags, R)
