"""DiffSeg (Tian et al., "Diffuse, Attend, and Segment", CVPR 2024), steps 4-7.

From Stable Diffusion self-attention to label maps, batched, on any device:

1. aggregate the per-resolution maps into one (R*R, R*R) map per image;
2. iteration 0: every anchor of a num_points x num_points grid takes the mean
   of the aggregate rows within KL threshold of it (one batched pass);
3. iterations 1..: greedy merging of the proposals by the same rule;
4. optional k-means refinement started at the proposals;
   (or, with ``grouping="ncut"``, steps 2-4 are a recursive normalized cut of a token affinity
   instead: :mod:`diffseg_core.grouping`);
5. NMS: upsample the proposals to the output size and take the argmax;
6. optional (off by default, so the paper's method label for label): before the
   argmax, PAMR refines the upsampled proposals with the image's own affinities
   (``boundaries="pamr"``, :mod:`diffseg_core.boundaries`); after it, small
   regions are absorbed and disconnected parts split (``min_region_area``,
   ``connected``, :mod:`diffseg_core.regions`).

Agrees with the official TensorFlow implementation on its fixtures (at least
99.9% of pixels; tests/test_agreement.py); on 2 CPU cores ~0.15 s per image
against the official code's 7-13 s (benchmarks/merge_bench.py, BENCHMARKS.md).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffseg_core import merge
from diffseg_core import boundaries as pamr_module
from diffseg_core.grouping import DEFAULT_ALPHA, ncut_proposals
from diffseg_core.aggregate import Weights, aggregate_attention, aggregate_side, anchor_grid
from diffseg_core.kmeans import refine_proposals
from diffseg_core.merge import (
    compact_labels,
    labels_from_proposals,
    merge_proposals,
    merge_proposals_batch,
    merge_with_anchors,
)
from diffseg_core.parameters import grouping_problem, method_thresholds, ncut_threshold_value
from diffseg_core.regions import clean_label_map, cleaning_problem

if TYPE_CHECKING:  # pragma: no cover
    from diffseg_core.labeler import Labeler



class DiffSeg:
    """The DiffSeg segmentor.

    Args:
        kl_threshold: tau, a float used at every iteration, or a sequence with
            one threshold per iteration (its length is then the number of
            iterations). 1.1 suits COCO-like images, 0.9 street scenes.
        num_points: side of the anchor grid (16 -> 256 anchors).
        iterations: number of merging iterations (default 3, or the length of
            a kl_threshold sequence; giving both, they must agree).
        refine: k-means refinement of the proposals (the reference's ``refine``).
        weights: per-resolution aggregation weights (default proportional to r).
        boundaries: ``"off"`` (the paper) or ``"pamr"``: the upsampled proposals are refined
            with the image's affinities before the argmax (label_maps then needs the images).
        pamr_iterations, pamr_dilations: PAMR's iterations and neighbourhood dilations.
        min_region_area: connected regions smaller than this many pixels are absorbed by
            the segment around them (0: off).
        connected: every connected region becomes its own segment.
        grouping: ``"kl-merge"`` (the paper's merge; kl_threshold, num_points, iterations and
            refine apply) or ``"ncut"``: a recursive normalized cut (:mod:`diffseg_core.grouping`).
        ncut_threshold: the cut's stopping threshold tau (a segment is split while its best cut's
            value is under it), or ``"auto"``: per image, from its own spectrum.
        ncut_affinity: ``"attention"`` (rows of the aggregated self-attention) or ``"features"``
            (the UNet encoder's last self-attention block's output, DiffCut's).
        ncut_alpha: the affinity's exponent, ((cos + 1) / 2) ** alpha.
    """

    def __init__(
        self,
        kl_threshold: float | Sequence[float] = 1.1,
        num_points: int = 16,
        iterations: int | None = None,
        refine: bool = False,
        weights: Weights = None,
        boundaries: str = "off",
        pamr_iterations: int = pamr_module.DEFAULT_ITERATIONS,
        pamr_dilations: Sequence[int] = pamr_module.DEFAULT_DILATIONS,
        min_region_area: int = 0,
        connected: bool = False,
        grouping: str = "kl-merge",
        ncut_threshold: float | str = "auto",
        ncut_affinity: str = "attention",
        ncut_alpha: float = DEFAULT_ALPHA,
    ) -> None:
        problem = grouping_problem(grouping, ncut_threshold, ncut_affinity, ncut_alpha)
        if problem:
            raise ValueError(problem)
        self.grouping = grouping
        self.ncut_threshold = ncut_threshold_value(ncut_threshold)
        self.ncut_affinity = ncut_affinity
        self.ncut_alpha = float(ncut_alpha)
        self.thresholds = method_thresholds(kl_threshold, num_points, iterations)
        self.num_points = num_points
        self.refine = bool(refine)
        self.weights = weights
        problem = pamr_module.boundaries_problem(boundaries, pamr_iterations, pamr_dilations) or cleaning_problem(
            min_region_area, connected)
        if problem:
            raise ValueError(problem)
        self.boundaries = boundaries
        self.pamr_iterations = int(pamr_iterations)
        self.pamr_dilations = tuple(int(d) for d in pamr_dilations)
        self.min_region_area = int(min_region_area)
        self.connected = bool(connected)
        self._scratch = _Scratch()

    @property
    def iterations(self) -> int:
        return len(self.thresholds)

    @property
    def needs_features(self) -> bool:
        """Whether proposals need the UNet's encoder features (`AttentionExtractor.extract`'s)."""
        return self.grouping == "ncut" and self.ncut_affinity == "features"

    @property
    def needs_images(self) -> bool:
        """Whether label_maps needs the images (PAMR's affinities come from their pixels)."""
        return self.boundaries == "pamr"

    @property
    def cleans(self) -> bool:
        """Whether label maps are cleaned after the argmax (then a map may hold more segments than proposals)."""
        return self.min_region_area > 1 or self.connected

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "CompVis/stable-diffusion-v1-4",
        *,
        kl_threshold: float | Sequence[float] | None = None,
        num_points: int | None = None,
        iterations: int | None = None,
        refine: bool = False,
        weights: Weights = None,
        boundaries: str | None = None,
        pamr_iterations: int | None = None,
        pamr_dilations: Sequence[int] | None = None,
        min_region_area: int = 0,
        connected: bool = False,
        grouping: str = "kl-merge",
        ncut_threshold: float | str = "auto",
        ncut_affinity: str = "attention",
        **load_kwargs: Any,
    ) -> Labeler:
        """Images to label maps in one call: a Stable Diffusion attention extractor plus DiffSeg.

        The method's parameters are the constructor's, checked before any model loads;
        those left out (None) are the model's defaults: its model card's (``diffseg.json``;
        tiny-demo ships one), else the paper's (`diffseg_core.method_defaults`).
        ``load_kwargs`` (device, dtype, image_size, timestep, revision, vocabulary, ...) go
        to :meth:`diffseg_core.labeler.Labeler.from_pretrained`.
        """
        from diffseg_core.method_defaults import with_method_defaults

        given = {"kl_threshold": kl_threshold, "num_points": num_points, "iterations": iterations, "weights": weights,
                 "boundaries": boundaries, "pamr_iterations": pamr_iterations, "pamr_dilations": pamr_dilations}
        diffseg = cls(**with_method_defaults(model, given), refine=refine, min_region_area=min_region_area,
                      connected=connected, grouping=grouping, ncut_threshold=ncut_threshold,
                      ncut_affinity=ncut_affinity)
        from diffseg_core.labeler import Labeler  # lazy: the algorithm alone never imports diffusers' side

        return Labeler.from_pretrained(model, diffseg, **load_kwargs)

    def segment(
        self, maps: Mapping[int, torch.Tensor], output_size: tuple[int, int] | None = None,
        images: torch.Tensor | None = None, features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Segment a batch.

        Args:
            maps: {resolution: (B, heads, r*r, r*r) or (B, r*r, r*r)} attention
                probabilities (rows sum to 1).
            output_size: (H, W) of the label maps; default 8R x 8R (512 x 512
                for the 64 x 64 maps of SD 1.x at 512 px).
            images: (B, C, S, S) float pixels, needed with ``boundaries="pamr"``.
            features: (B, C, h, w) encoder features, needed with ``ncut_affinity="features"``.

        Returns:
            int64 (B, H, W), segment indices 0..K-1 (not classes), numbered in
            proposal order, without gaps.
        """
        proposals = self.proposals(maps, features)
        R = aggregate_side(maps[max(maps)])  # the finest map's side, as the KL merge's proposals have
        size = output_size if output_size is not None else (8 * R, 8 * R)
        return torch.stack(self.label_maps(proposals, [size] * len(proposals), images))

    def label_maps(
        self, proposals: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], images: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """NMS of each image's proposals at its own (H, W): int64 label maps 0..K-1 without gaps,
        on the proposals' device (nothing is copied back here unless the maps are cleaned).

        ``images``: (B, C, S, S) float pixels the proposals came from (the model's input), needed
        with ``boundaries="pamr"``: the proposals are upsampled to S x S, refined there with the
        pixels' affinities, and the refined maps upsampled to (H, W) for the argmax. With
        ``min_region_area`` or ``connected`` each map is then cleaned on the host, at (H, W).
        """
        if len(proposals) != len(sizes):
            raise ValueError(f"{len(proposals)} images of proposals but {len(sizes)} sizes")
        if self.needs_images:
            if images is None or images.ndim != 4 or images.shape[0] != len(proposals):
                raise ValueError("boundaries='pamr' needs the batch's images, (B, C, S, S), one per proposal set")
            proposals = self.refined(proposals, images)
        maps = [compact_labels(labels_from_proposals(p, size), p.shape[0]) for p, size in zip(proposals, sizes)]
        if not self.cleans:
            return maps
        return [torch.from_numpy(clean_label_map(m.cpu().numpy(), self.min_region_area, self.connected)).to(m.device)
                for m in maps]

    def refined(self, proposals: Sequence[torch.Tensor], images: torch.Tensor) -> list[torch.Tensor]:
        """PAMR of each image's (K_b, R, R) proposals at the images' (S, S): (K_b, S, S) soft maps.

        One batched pass: the images' K_b differ, so the masks are padded with zero maps to the
        largest K (PAMR is linear: a zero map stays zero, and the argmax never picks it).
        """
        size = tuple(images.shape[-2:])
        most = max(p.shape[0] for p in proposals)
        masks = torch.zeros((len(proposals), most, *size), dtype=torch.float32, device=proposals[0].device)
        for b, p in enumerate(proposals):
            masks[b, : p.shape[0]] = pamr_module.proposal_distribution(p, size)[0]
        masks = pamr_module.pamr(images, masks, self.pamr_iterations, self.pamr_dilations)
        return [masks[b, : p.shape[0]] for b, p in enumerate(proposals)]

    def proposals(self, maps: Mapping[int, torch.Tensor], features: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Merged proposals per image, each (K_b, R, R) (with ``grouping="ncut"`` (K_b, r, r), at
        the cut's token grid): what NMS turns into labels. ``features``: the UNet encoder's
        (B, C, h, w) features, needed with ``ncut_affinity="features"``.

        On a CPU the images of a batch go one at a time: one image's working
        set (aggregate and its logarithms, 128 MB at R = 64) stays in a large
        last-level cache, a batch's does not, and batching buys nothing there.
        """
        if self.grouping == "ncut":
            if self.needs_features and features is None:
                raise ValueError("ncut_affinity='features' needs the UNet's encoder features from the same pass")
            aggregate = aggregate_attention(maps, self.weights) if self.ncut_affinity == "attention" else None
            return ncut_proposals(aggregate, features, threshold=self.ncut_threshold, affinity=self.ncut_affinity,
                                  alpha=self.ncut_alpha)
        batch = _batch_size(maps)
        if batch is not None and batch > 1 and not merge.runs_batched(_device(maps)):
            return [p for b in range(batch) for p in self.proposals({r: m[b : b + 1] for r, m in maps.items()})]
        with self._scratch.lock:
            out = self._scratch.get("aggregate", _aggregate_shape(maps))
            return self.proposals_from_aggregate(aggregate_attention(maps, self.weights, out=out))

    def proposals_from_aggregate(self, aggregate: torch.Tensor) -> list[torch.Tensor]:
        """Steps 2-4 on an already aggregated (B, R*R, R*R) attention tensor (any float dtype)."""
        if aggregate.ndim != 3 or aggregate.shape[1] != aggregate.shape[2] or aggregate.shape[0] == 0:
            raise ValueError(f"aggregate: expected (B, R*R, R*R) with B >= 1, got {tuple(aggregate.shape)}")
        R = aggregate_side(aggregate)
        aggregate = aggregate.float()

        with self._scratch.lock:
            anchors = self._scratch.anchors(R, self.num_points, aggregate.device)
            log_buffer = self._scratch.get("log", (aggregate.shape, aggregate.device))
            first = merge_with_anchors(aggregate, anchors, self.thresholds[0], log_buffer=log_buffer)
        if not merge.runs_batched(aggregate.device):
            merged = []
            for b in range(aggregate.shape[0]):
                proposals = first[b]
                for tau in self.thresholds[1:]:
                    proposals = merge_proposals(proposals, tau)
                merged.append(proposals)
        else:  # the whole batch at once: one host round trip per iteration, not one per image
            counts = np.full(aggregate.shape[0], first.shape[1])
            for tau in self.thresholds[1:]:
                first, counts = merge_proposals_batch(first, counts, tau)
            merged = [first[b, : int(k)] for b, k in enumerate(counts)]
        out = []
        for b, proposals in enumerate(merged):
            if self.refine:
                proposals = refine_proposals(aggregate[b], proposals)
            out.append(proposals.reshape(-1, R, R))
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scratch"] = None  # buffers and locks stay with their process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._scratch = _Scratch()

    def __repr__(self) -> str:
        return (
            f"DiffSeg(kl_threshold={self.thresholds}, num_points={self.num_points}, "
            f"refine={self.refine}, weights={self.weights}"
            + (f", grouping='ncut', ncut_threshold={self.ncut_threshold!r}, ncut_affinity={self.ncut_affinity!r}, "
               f"ncut_alpha={self.ncut_alpha:g}" if self.grouping == "ncut" else "")
            + (f", boundaries={self.boundaries!r}, pamr_iterations={self.pamr_iterations}, "
               f"pamr_dilations={list(self.pamr_dilations)}" if self.boundaries != "off" else "")
            + (f", min_region_area={self.min_region_area}" if self.min_region_area else "")
            + (", connected=True" if self.connected else "") + ")"
        )


class _Scratch:
    """Float32 work buffers kept between calls.

    At R = 64 the aggregate and its logarithms are 64 MB per image each; fresh
    allocations page-fault on first touch, which costs as much as the
    arithmetic on a CPU. Reusing them makes repeated calls (a labeling job's
    steady state) ~25% faster. The lock is re-entrant because proposals()
    calls proposals_from_aggregate().
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._buffers: dict[str, torch.Tensor] = {}

    def anchors(self, R: int, num_points: int, device: torch.device) -> torch.Tensor:
        """The anchor grid's indices, kept on ``device`` (a fresh host-to-device copy makes the host wait)."""
        key = f"anchors:{R}:{num_points}"
        grid = self._buffers.get(key)
        if grid is None or grid.device != device:
            grid = anchor_grid(R, num_points).to(device)
            self._buffers[key] = grid
        return grid

    def get(self, role: str, spec: tuple[torch.Size, torch.device] | None) -> torch.Tensor | None:
        if spec is None:
            return None
        shape, device = spec
        buffer = self._buffers.get(role)
        if buffer is None or buffer.shape != shape or buffer.device != device:
            self._buffers.pop(role, None)  # free the old one before allocating
            buffer = torch.empty(shape, dtype=torch.float32, device=device)
            self._buffers[role] = buffer
        return buffer


def _batch_size(maps: Mapping[int, torch.Tensor]) -> int | None:
    """The batch size if the input is well-formed enough to tell, else None
    (aggregate_attention then says what is wrong)."""
    try:
        sizes = {m.shape[0] for m in maps.values() if m.ndim in (3, 4)}
    except (AttributeError, TypeError):
        return None
    return sizes.pop() if len(sizes) == 1 else None


def _device(maps: Mapping[int, torch.Tensor]) -> torch.device:
    return next(iter(maps.values())).device


def _aggregate_shape(maps: Mapping[int, torch.Tensor]) -> tuple[torch.Size, torch.device] | None:
    """Shape and device the aggregate of ``maps`` will have, or None if the input is malformed
    (aggregate_attention then says what is wrong)."""
    try:
        finest = maps[max(maps)]
        batch, seq = finest.shape[0], finest.shape[-1]
        return torch.Size((batch, seq, seq)), finest.device
    except (TypeError, ValueError, AttributeError, IndexError, KeyError):
        return None
