"""Images to DiffSeg label maps in one call: `AttentionExtractor` + `DiffSeg`.

    labeler = DiffSeg.from_pretrained("CompVis/stable-diffusion-v1-4", kl_threshold=1.1)
    labels = labeler(images)   # list of int64 (H_i, W_i) arrays, one per image

Each image's merged proposals (R x R) are upsampled bilinearly straight to that
image's own size before the per-pixel argmax, so label boundaries are as
smooth at 3000 px as at 512 px (never a nearest-neighbour resize of a 512 map).

Imports point one way: `DiffSeg.from_pretrained` (segmentor) builds the method and
hands it to `Labeler.from_pretrained`; this module never imports the segmentor (it types
the method with `diffseg_core.segmentation_method.SegmentationMethod`, which DiffSeg satisfies).

With a vocabulary, segments also get class names from the same UNet pass:

    labeler = DiffSeg.from_pretrained(model, vocabulary="person,dog,grass")
    for result in labeler.label(images):
        result.label_map, result.classes, result.scores, result.class_map
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from diffseg_core.class_vote import DEFAULT_CLASS_THRESHOLD, check_voting, combine_class_attention, vote_classes
from diffseg_core.extract import AttentionExtractor
from diffseg_core.parameters import anchor_grid_problem
from diffseg_core.segmentation_method import SegmentationMethod

__all__ = ["LabeledImage", "Labeler", "anchor_grid_problem", "image_sizes"]


@dataclass
class LabeledImage:
    """One image's labels: ``label_map`` int64 (H, W), segment ids 0..K-1; with a vocabulary,
    ``classes`` int64 (K,) (index into the vocabulary, -1 = unknown), ``scores`` float32 (K,)
    (share of the segment's pixels that vote for its class) and ``class_map`` uint8 (H, W)
    (class per pixel, 255 = unknown)."""

    label_map: np.ndarray
    classes: np.ndarray | None = None
    scores: np.ndarray | None = None
    class_map: np.ndarray | None = None


def image_sizes(images: Any) -> list[tuple[int, int]]:
    """(H, W) of each image: arrays (H, W[, C]) or a (B, H, W, C) array, or PIL images."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [tuple(images.shape[1:3])] * images.shape[0]
    sizes = []
    for img in images:
        if hasattr(img, "size") and not isinstance(img, np.ndarray):  # PIL: (W, H)
            w, h = img.size
            sizes.append((h, w))
        else:
            sizes.append(tuple(np.shape(img)[:2]))
    return sizes


class Labeler:
    """Stable Diffusion self-attention + DiffSeg -> label maps at each image's own size."""

    def __init__(
        self,
        extractor: AttentionExtractor,
        diffseg: SegmentationMethod,
        *,
        class_voting: str = "majority",
        class_threshold: float = DEFAULT_CLASS_THRESHOLD,
    ):
        check_voting(class_voting, class_threshold)
        self.extractor = extractor
        self.diffseg = diffseg
        self.class_voting = class_voting
        self.class_threshold = float(class_threshold)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The vocabulary's names (class i of `label`'s results), or None without one."""
        vocab = self.extractor.vocabulary
        return vocab.names if vocab is not None else None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        diffseg: SegmentationMethod,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        image_size: int | None = None,
        timestep: int = 300,
        revision: str | None = None,
        allow_unsafe_weights: bool = False,
        vocabulary: Any = None,
        class_voting: str = "majority",
        class_threshold: float = DEFAULT_CLASS_THRESHOLD,
    ) -> "Labeler":
        """Load the model (see `AttentionExtractor.from_pretrained`) to run ``diffseg`` on its attention.

        Most callers want ``DiffSeg.from_pretrained(model, kl_threshold=..., ...)``, which
        builds the method from its parameters (before any model loads) and calls this.

        ``image_size=None`` is the model's native size (512 for SD 1.x).
        ``vocabulary`` (a preset such as ``"coco-stuff-27"``, ``"person,dog,grass"`` or a
        list) names segments in `label`; ``class_voting`` ``"majority"`` or ``"mean"``;
        a segment whose class holds less than ``class_threshold`` of its pixels is unknown.
        """
        check_voting(class_voting, class_threshold)
        extractor = AttentionExtractor.from_pretrained(
            model, device=device, dtype=dtype, timestep=timestep, image_size=image_size,
            revision=revision, allow_unsafe_weights=allow_unsafe_weights, vocabulary=vocabulary,
        )
        problem = anchor_grid_problem(
            diffseg.num_points, extractor.attention_resolutions, model, extractor.image_size, diffseg.grouping
        )
        if problem:
            raise ValueError(problem)
        return cls(extractor, diffseg, class_voting=class_voting, class_threshold=class_threshold)

    def __call__(self, images: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Label maps, int64 (H_i, W_i) with values 0..K_i-1, one per image, in order."""
        sizes = image_sizes(images)
        if not sizes:
            return []
        pixels = self.extractor.to_pixels(images)
        if self.diffseg.needs_features:
            extraction = self.extractor.extract(pixels)
            return self.labels_from_attention(extraction.self_attention, sizes, pixels, extraction.features)
        return self.labels_from_attention(self.extractor(pixels), sizes, pixels)

    def labels_from_attention(
        self, maps: Mapping[int, torch.Tensor], sizes: Sequence[tuple[int, int]], pixels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> list[np.ndarray]:
        """DiffSeg on extracted maps; NMS at each image's own (H, W). ``pixels``: the model's
        (B, 3, S, S) input, which ``boundaries="pamr"`` refines with; ``features``: the same pass's
        encoder features, which ``ncut_affinity="features"`` cuts."""
        proposals = self.diffseg.proposals(maps, features)
        if len(proposals) != len(sizes):
            raise ValueError(f"{len(proposals)} images of attention maps but {len(sizes)} sizes")
        sizes = [(int(h), int(w)) for h, w in sizes]
        return [m.cpu().numpy().astype(np.int64, copy=False) for m in self.diffseg.label_maps(proposals, sizes, pixels)]

    def label(self, images: Sequence[np.ndarray] | np.ndarray) -> list[LabeledImage]:
        """Label maps and, with a vocabulary, each segment's class, from one UNet pass per batch."""
        sizes = image_sizes(images)
        if not sizes:
            return []
        pixels = self.extractor.to_pixels(images)
        extraction = self.extractor.extract(pixels)
        label_maps = self.labels_from_attention(extraction.self_attention, sizes, pixels, extraction.features)
        if extraction.class_attention is None:
            return [LabeledImage(label_map=m) for m in label_maps]
        class_maps = combine_class_attention(extraction.class_attention, self.diffseg.weights)
        out = []
        for labels, maps in zip(label_maps, class_maps):
            voted = vote_classes(maps, labels, voting=self.class_voting, threshold=self.class_threshold)
            out.append(LabeledImage(label_map=labels, classes=voted.classes, scores=voted.scores,
                                    class_map=voted.class_map(labels)))
        return out

    @property
    def model_info(self) -> dict[str, Any]:
        """The extractor's provenance plus the DiffSeg parameters."""
        info = self.extractor.model_info
        info["diffseg"] = {
            "kl_threshold": list(self.diffseg.thresholds),
            "num_points": self.diffseg.num_points,
            "iterations": self.diffseg.iterations,
            "refine": self.diffseg.refine,
            "weights": _jsonable_weights(self.diffseg.weights),
        }
        if self.diffseg.grouping != "kl-merge":  # only when not the paper's merge, as boundaries below
            info["diffseg"].update(grouping=self.diffseg.grouping, ncut_threshold=self.diffseg.ncut_threshold,
                                   ncut_affinity=self.diffseg.ncut_affinity, ncut_alpha=self.diffseg.ncut_alpha)
        if self.diffseg.boundaries != "off":  # only when on: the paper's method reads as it always did
            info["diffseg"].update(boundaries=self.diffseg.boundaries, pamr_iterations=self.diffseg.pamr_iterations,
                                   pamr_dilations=list(self.diffseg.pamr_dilations))
        if self.diffseg.cleans:
            info["diffseg"].update(min_region_area=self.diffseg.min_region_area, connected=self.diffseg.connected)
        vocab = self.extractor.vocabulary
        if vocab is not None:  # the extractor's provenance is the model's alone (as the driver derives it)
            info["vocabulary"] = dict(vocab.vocabulary.to_json(), prompts=list(vocab.prompts))
            info["class_voting"] = {"voting": self.class_voting, "threshold": self.class_threshold}
        return info

    def __repr__(self) -> str:
        return f"Labeler({self.extractor!r}, {self.diffseg!r})"


def _jsonable_weights(weights: Any) -> Any:
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        return {str(k): float(v) for k, v in weights.items()}
    return repr(weights)
