"""The stateful stages: the model actor (one extractor each) and the CPU merge actor.

``--merge-on gpu``: LabelActor runs extract -> aggregate -> merge -> NMS and ships
only label maps (raw uint16 at each image's own size). ``--merge-on cpu``: it ships
the aggregated attention as float16 and MergeActor does merge -> NMS on CPU.
A failing batch is retried image by image, so one poisoned image costs one error row.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from pipeline.labels import labels_at_size
from pipeline.tasks import error_values

logger = logging.getLogger(__name__)


def _model_error(exc: BaseException) -> str:
    return f"model error: {type(exc).__name__}: {exc}"


class LabelActor:
    """Holds one AttentionExtractor (+ DiffSeg when merging here). Batches of decoded rows in."""

    def __init__(
        self,
        model: str,
        *,
        device: str | None,
        dtype: str | None,
        image_size: int | None,
        timestep: int,
        revision: str | None,
        merge_on: str,
        diffseg_kwargs: dict[str, Any],
        threads: int | None = None,
        allow_unsafe_weights: bool = False,
    ):
        from diffseg_core.extract import AttentionExtractor
        from diffseg_core.segmentor import DiffSeg

        if threads:
            torch.set_num_threads(threads)
        self.extractor = AttentionExtractor.from_pretrained(
            model, device=device, dtype=dtype, image_size=image_size, timestep=timestep, revision=revision,
            allow_unsafe_weights=allow_unsafe_weights,
        )
        self.diffseg = DiffSeg(**diffseg_kwargs)
        self.merge_on = merge_on

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        errors = error_values(batch["error"])
        ok = [i for i, e in enumerate(errors) if e is None]
        n = len(errors)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        if self.merge_on == "gpu":
            label_raw: list[bytes] = [b""] * n
            for i, result in self._run(batch["pixels"], ok, errors, self._labels, batch):
                label_raw[i] = result
            out["label_raw"] = np.array(label_raw, dtype=object)
        else:
            aggregates: np.ndarray | None = None
            for i, result in self._run(batch["pixels"], ok, errors, self._aggregate, batch):
                if aggregates is None:
                    aggregates = np.zeros((n,) + result.shape, dtype=np.float16)
                aggregates[i] = result
            out["aggregate"] = aggregates if aggregates is not None else np.zeros((n, 1, 1), dtype=np.float16)
        out["error"] = np.array(errors, dtype=object)
        out["_t_model"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return out

    def _run(self, pixels: np.ndarray, ok: list[int], errors: list, fn, batch):
        """Yield (row, result) for ok rows; on a batch failure retry one by one, marking errors."""
        if not ok:
            return
        try:
            yield from zip(ok, fn(np.ascontiguousarray(pixels[ok]), [row_size(batch, i) for i in ok]))
            return
        except Exception as exc:  # noqa: BLE001
            logger.warning("batch of %d failed (%s); retrying one image at a time", len(ok), exc)
        for i in ok:
            try:
                yield i, fn(np.ascontiguousarray(pixels[i : i + 1]), [row_size(batch, i)])[0]
            except Exception as exc:  # noqa: BLE001
                errors[i] = _model_error(exc)

    @torch.inference_mode()
    def _aggregate_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        from diffseg_core.aggregate import aggregate_attention

        return aggregate_attention(self.extractor(pixels), self.diffseg.weights)

    @torch.inference_mode()
    def _labels(self, pixels: np.ndarray, sizes: list[tuple[int, int]]) -> list[bytes]:
        # DiffSeg.proposals, not aggregate + proposals_from_aggregate by hand: it
        # reuses its work buffers and walks a CPU batch one image at a time.
        proposals = self.diffseg.proposals(self.extractor(pixels))
        return [labels_at_size(p, size).tobytes() for p, size in zip(proposals, sizes)]

    def _aggregate(self, pixels: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        agg = self._aggregate_tensor(pixels).to(torch.float16).cpu().numpy()
        return list(agg)


def row_size(batch: dict[str, np.ndarray], i: int) -> tuple[int, int]:
    """(height, width) of row i: the size its label map is produced at."""
    return int(batch["height"][i]), int(batch["width"][i])


class MergeActor:
    """CPU merge for ``--merge-on cpu``: float16 aggregates in, label maps out."""

    def __init__(self, diffseg_kwargs: dict[str, Any], threads: int | None = 1):
        from diffseg_core.segmentor import DiffSeg

        if threads:
            torch.set_num_threads(threads)
        self.diffseg = DiffSeg(**diffseg_kwargs)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        errors = error_values(batch["error"])
        n = len(errors)
        label_raw: list[bytes] = [b""] * n
        for i in range(n):
            if errors[i] is not None:
                continue
            try:
                agg = torch.from_numpy(np.array(batch["aggregate"][i], dtype=np.float32))[None]
                proposals = self.diffseg.proposals_from_aggregate(agg)[0]
                label_raw[i] = labels_at_size(proposals, row_size(batch, i)).tobytes()
            except Exception as exc:  # noqa: BLE001
                errors[i] = f"merge error: {type(exc).__name__}: {exc}"
        out = {k: v for k, v in batch.items() if k != "aggregate"}
        out["label_raw"] = np.array(label_raw, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["_t_merge"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return out
