"""DiffSeg: unsupervised segmentation from Stable Diffusion self-attention.

The method only: torch + numpy, no Ray, no fsspec, no I/O beyond loading a model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "DiffSeg",
    "aggregate_attention",
    "kmeans_constant",
    "kmeans_per_image",
    "SegmentationMetrics",
    "AttentionExtractor",
    "Labeler",
]

# Lazy: importing the algorithm must not import diffusers/transformers.
_LAZY = {
    "DiffSeg": ("diffseg_core.segmentor", "DiffSeg"),
    "aggregate_attention": ("diffseg_core.aggregate", "aggregate_attention"),
    "kmeans_constant": ("diffseg_core.kmeans", "kmeans_constant"),
    "kmeans_per_image": ("diffseg_core.kmeans", "kmeans_per_image"),
    "SegmentationMetrics": ("diffseg_core.metrics", "SegmentationMetrics"),
    "AttentionExtractor": ("diffseg_core.extract", "AttentionExtractor"),
    "Labeler": ("diffseg_core.labeler", "Labeler"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'diffseg_core' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from diffseg_core.aggregate import aggregate_attention
    from diffseg_core.extract import AttentionExtractor
    from diffseg_core.kmeans import kmeans_constant, kmeans_per_image
    from diffseg_core.labeler import Labeler
    from diffseg_core.metrics import SegmentationMetrics
    from diffseg_core.segmentor import DiffSeg
