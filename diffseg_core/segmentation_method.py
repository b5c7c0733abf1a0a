"""What the `Labeler` needs of the method it runs: the `SegmentationMethod` protocol.

`diffseg_core.segmentor.DiffSeg` is the method and satisfies it without naming it. The
labeler types its method with this protocol instead of importing the segmentor, so the
imports point one way: the segmentor (``DiffSeg.from_pretrained``) imports the labeler,
and both read this module, which imports neither.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from diffseg_core.aggregate import Weights

__all__ = ["SegmentationMethod"]


class SegmentationMethod(Protocol):
    """Attention maps to label maps, and the parameters that say how (for provenance)."""

    @property
    def thresholds(self) -> Sequence[float]: ...

    @property
    def num_points(self) -> int: ...

    @property
    def iterations(self) -> int: ...

    @property
    def refine(self) -> bool: ...

    @property
    def weights(self) -> Weights: ...

    @property
    def boundaries(self) -> str: ...

    @property
    def pamr_iterations(self) -> int: ...

    @property
    def pamr_dilations(self) -> Sequence[int]: ...

    @property
    def min_region_area(self) -> int: ...

    @property
    def connected(self) -> bool: ...

    @property
    def cleans(self) -> bool: ...

    @property
    def grouping(self) -> str: ...

    @property
    def ncut_threshold(self) -> float | str: ...

    @property
    def ncut_affinity(self) -> str: ...

    @property
    def ncut_alpha(self) -> float: ...

    @property
    def needs_features(self) -> bool: ...

    def proposals(self, maps: Mapping[int, torch.Tensor], features: torch.Tensor | None = None
                  ) -> list[torch.Tensor]: ...

    def label_maps(
        self, proposals: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], images: torch.Tensor | None = None
    ) -> list[torch.Tensor]: ...
