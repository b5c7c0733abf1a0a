"""The model actor: decoded rows in, packed label maps out.

A LabelActor holds one AttentionExtractor and one DiffSeg. Per batch, on its
device: the uint8 pixels (already resized by the decode tasks) are copied as
uint8 (pinned, asynchronously on a GPU) and become floats there; VAE, UNet,
merge and NMS at each image's own size follow; the batch's label maps come back
to the host in one copy and leave the actor zstd-packed (``label_packed``, tens
of KB per 512 px image, where a raw uint16 map was 0.5 MB and a 12-megapixel
photo's 24 MB). The encode tasks unpack them and write the PNGs.

Ray runs ``CONCURRENT_CALLS`` calls of an actor at once (``pool_strategy``): the
device work is serialised by a lock, so one batch's host work (Ray's batching,
the pinned copy, packing) overlaps the other's device work.

With a vocabulary, the same UNet pass also gives each image's class attention;
each segment's class is voted on the device (``diffseg_core.class_vote``) and
leaves the actor packed beside its label map (``classes_packed``: a class index
and a score per segment id), a few bytes per segment.

A failing batch is retried image by image, so one poisoned image costs one error row.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.job.labels import labels_to_host, pack_classes, pack_label_map
from pipeline.job.provenance import COLUMNS as PROVENANCE, model_provenance
from pipeline.job.tasks import error_values

logger = logging.getLogger(__name__)

#: CPUs Ray reserves for a GPU actor, which is also its torch thread count. Its
#: host work is light (one pinned copy, zstd, Ray's batching: ~1 ms per 512 px
#: image); without a bound torch would start one thread per core of the node.
GPU_ACTOR_CPUS = 2
#: Calls of one actor that run at once (their device work never overlaps).
CONCURRENT_CALLS = 2
#: Batches Ray queues on one actor: those running plus as many fetched ahead.
TASKS_IN_FLIGHT = 2 * CONCURRENT_CALLS
#: AttentionExtractor options for GPU actors; benchmarks/actor_bench.py measures each.
GPU_OPTIONS: dict[str, Any] = {"channels_last": False, "compile": False}


def pool_strategy(size: int, max_size: int | None = None):
    """Ray Data's actor pool for LabelActor: ``size`` actors (autoscaling up to ``max_size``
    when given), two calls at a time each."""
    from ray.data import ActorPoolStrategy

    sizes = {"min_size": size, "max_size": max(size, max_size)} if max_size else {"size": size}
    return ActorPoolStrategy(
        **sizes,
        max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT,
        max_concurrent_calls_per_actor=CONCURRENT_CALLS,
        enable_true_multi_threading=True,  # our lock serialises the device work, not Ray's
    )


def _model_error(exc: BaseException) -> str:
    return f"model error: {type(exc).__name__}: {exc}"


class LabelActor:
    """Holds one AttentionExtractor and one DiffSeg. Batches of decoded rows in."""

    def __init__(
        self,
        model: str,
        *,
        device: str | None,
        dtype: str | None,
        image_size: int | None,
        timestep: int,
        revision: str | None,
        diffseg_kwargs: dict[str, Any],
        threads: int | None = None,
        allow_unsafe_weights: bool = False,
        vae_dtype: str | None = None,
        gpu_options: dict[str, Any] | None = None,
        vocabulary: list[str] | None = None,
        class_voting: str = "majority",
        class_threshold: float = 0.5,
    ):
        from diffseg_core.extract import AttentionExtractor
        from diffseg_core.model_loading import quiet_loading
        from diffseg_core.segmentor import DiffSeg

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
        options = dict(GPU_OPTIONS if gpu_options is None else gpu_options) if device == "cuda" else {}
        with quiet_loading():  # the driver already said what the model is; no progress bar per actor
            self.extractor = AttentionExtractor.from_pretrained(
                model, device=device, dtype=dtype, image_size=image_size, timestep=timestep, revision=revision,
                allow_unsafe_weights=allow_unsafe_weights,
                vae_dtype=vae_dtype, vocabulary=vocabulary, **options,
            )
        self.diffseg = DiffSeg(**diffseg_kwargs)
        self.class_voting, self.class_threshold = class_voting, float(class_threshold)
        self._device_lock = threading.Lock()
        self._provenance: str | None = None

    @classmethod
    def from_parts(cls, extractor: Any, diffseg: Any) -> "LabelActor":
        """An actor around an extractor built elsewhere (benchmarks: a model built from configs)."""
        actor = cls.__new__(cls)
        actor.extractor, actor.diffseg, actor._device_lock = extractor, diffseg, threading.Lock()
        actor.class_voting, actor.class_threshold = "majority", 0.5
        actor._provenance = None
        return actor

    @property
    def provenance(self) -> str:
        """What this actor runs with, from its own extractor and DiffSeg (pipeline.job.provenance)."""
        if self._provenance is None:
            self._provenance = model_provenance(self.extractor, self.diffseg, self.class_voting, self.class_threshold)
        return self._provenance

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        errors = error_values(batch["error"])
        ok = [i for i, e in enumerate(errors) if e is None]
        n = len(errors)
        named = self.extractor.vocabulary is not None
        packed: list[bytes] = [b""] * n
        classes: list[bytes] = [b""] * n
        sizes = [row_size(batch, i) for i in range(n)]
        for i, result in self._run(batch["pixels"], ok, errors, sizes,
                                   self.labels_and_classes if named else self.label_maps):
            try:
                labels, voted = result if named else (result, None)
                packed[i] = pack_label_map(labels)
                if voted is not None:
                    classes[i] = pack_classes(voted.classes, voted.scores)
            except Exception as exc:  # noqa: BLE001
                errors[i] = _model_error(exc)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["label_packed"] = np.array(packed, dtype=object)
        if named:
            out["classes_packed"] = np.array(classes, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out[PROVENANCE["model"]] = np.full(n, self.provenance, dtype=object)
        out["_t_model"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return out

    def _run(
        self, pixels: np.ndarray, ok: list[int], errors: list, sizes: list[tuple[int, int]], fn: Any
    ) -> Iterator[tuple[int, Any]]:
        """Yield (row, fn's result) for ok rows; on a batch failure retry one by one, marking errors."""
        if not ok:
            return
        try:
            yield from zip(ok, fn(pixels[ok], [sizes[i] for i in ok]))
            return
        except Exception as exc:  # noqa: BLE001
            logger.warning("batch of %d failed (%s); retrying one image at a time", len(ok), exc)
        for i in ok:
            try:
                yield i, fn(pixels[i : i + 1], [sizes[i]])[0]
            except Exception as exc:  # noqa: BLE001
                errors[i] = _model_error(exc)

    @torch.inference_mode()
    def label_maps(self, pixels: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """(B, S, S, 3) uint8 pixels -> one uint8/uint16 label map per image, at ``sizes`` (H, W).

        The batch loop of this actor, usable without Ray (benchmarks/actor_bench.py).
        The pinned copy is made before taking the device lock; everything after it
        is one stream of device work ending in one copy back.
        """
        staged = self.extractor.to_pixels(pixels)
        with self._device_lock:
            if self.diffseg.needs_features:
                extraction = self.extractor.extract(staged)
                proposals = self.diffseg.proposals(extraction.self_attention, extraction.features)
            else:
                proposals = self.diffseg.proposals(self.extractor(staged))
            maps = self.diffseg.label_maps(proposals, sizes, staged)
            return labels_to_host(maps, segment_counts(self.diffseg, proposals, maps))

    @torch.inference_mode()
    def labels_and_classes(self, pixels: np.ndarray, sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, Any]]:
        """`label_maps` plus each segment's class (``SegmentClasses``) from the same UNet pass."""
        from diffseg_core.class_vote import combine_class_attention, vote_classes

        staged = self.extractor.to_pixels(pixels)
        with self._device_lock:
            extraction = self.extractor.extract(staged)
            proposals = self.diffseg.proposals(extraction.self_attention, extraction.features)
            maps = self.diffseg.label_maps(proposals, sizes, staged)
            counts = segment_counts(self.diffseg, proposals, maps)
            class_maps = combine_class_attention(extraction.class_attention, self.diffseg.weights)
            voted = [
                vote_classes(c, m, num_segments=k, voting=self.class_voting, threshold=self.class_threshold)
                for c, m, k in zip(class_maps, maps, counts)
            ]
            return list(zip(labels_to_host(maps, counts), voted))


def segment_counts(diffseg: Any, proposals: list[torch.Tensor], maps: list[torch.Tensor]) -> list[int]:
    """A bound on each label map's ids: its proposals, or, when the maps were cleaned (a split
    segment gives several), the map's own largest id + 1 (cleaned maps were on the host already)."""
    if getattr(diffseg, "cleans", False):
        return [int(m.max()) + 1 for m in maps]
    return [p.shape[0] for p in proposals]


def row_size(batch: dict[str, np.ndarray], i: int) -> tuple[int, int]:
    """(height, width) of row i: the size its label map is produced at."""
    return int(batch["height"][i]), int(batch["width"][i])
