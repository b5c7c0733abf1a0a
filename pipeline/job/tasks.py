"""The stateless CPU stages of the plan, as Ray Data batch functions.

``read_decode``: one work shard in -> decoded rows out, in chunks (a generator, so a
shard of 1,000 files never sits in memory at once). ``encode_rows``: the model
actor's packed label maps -> the output columns. Both turn every per-image failure into an
``error`` value; only a bug raises.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipeline.data.decode import DEFAULT_MAX_PIXELS, decode_image
from pipeline.data.encode import class_png, encode_label, name_segments
from pipeline.data.retry import RetryPolicy, resilient_read
from pipeline.data.schema import (
    CLASS_MAP,
    CLASS_SEGMENT,
    SEGMENT,
    SHARD_ID,
    SHARD_ROWS,
    UNKNOWN_CLASS,
)
from pipeline.data.readers import RawImage, chunked, shard_error_id
from pipeline.job.labels import unpack_classes, unpack_label_map
from pipeline.job.provenance import COLUMNS as PROVENANCE, decode_provenance, encode_provenance

DECODE_CHUNK = 32


def read_decode(
    batch: dict[str, np.ndarray],
    *,
    root: str,
    image_size: int,
    storage_options: dict[str, Any] | None = None,
    image_column: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    chunk: int = DECODE_CHUNK,
    paper_preprocess: bool = False,
    retry: RetryPolicy | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Shards (columns shard_id, kind, paths[, only]) -> decoded rows, ``chunk`` at a time.

    The shard's row count is only known at the end for tar and Parquet shards, so the
    last chunk is held back and carries it (``_shard_rows``); earlier ones carry -1.
    ``only`` (``--retry-errors``): the image ids to read from the shard, or None for all.
    """
    only_column = batch["only"] if "only" in batch else [None] * len(batch["shard_id"])
    provenance = decode_provenance(image_size=image_size, max_pixels=max_pixels, paper_preprocess=paper_preprocess,
                                   image_column=image_column)
    for shard_id, kind, paths, only in zip(batch["shard_id"], batch["kind"], batch["paths"], only_column):
        paths = [str(p) for p in paths]
        only = [str(i) for i in only] if isinstance(only, (list, tuple, np.ndarray)) else None  # None: NaN
        held: dict[str, np.ndarray] | None = None
        rows = 0
        reads = _safe_read(kind, paths, root, storage_options, image_column, retry, only)
        for chunk_rows in chunked(reads, chunk):
            start = time.perf_counter()
            out = _decode_chunk(chunk_rows, image_size, max_pixels, paper_preprocess)
            out["_t_decode"] = np.full(len(chunk_rows), (time.perf_counter() - start) / len(chunk_rows))
            out[SHARD_ID] = np.full(len(chunk_rows), int(shard_id), dtype=np.int64)
            out[SHARD_ROWS] = np.full(len(chunk_rows), -1, dtype=np.int64)
            out[PROVENANCE["decode"]] = np.full(len(chunk_rows), provenance, dtype=object)
            rows += len(chunk_rows)
            if held is not None:
                yield held
            held = out
        if held is not None:
            held[SHARD_ROWS][:] = rows
            yield held


def _safe_read(
    kind: str, paths: list[str], root: str, storage_options: dict[str, Any] | None, image_column: str | None,
    retry: RetryPolicy | None = None, only: list[str] | None = None,
) -> Iterator[RawImage]:
    """read_source with the world's faults retried (pipeline/data/retry.py), but a shard that cannot be
    opened or breaks midway for a reason of its own ends in one error row."""
    try:
        yield from resilient_read(kind, paths, root, storage_options, image_column, retry, only)
    except Exception as exc:  # noqa: BLE001 - corrupt tar / Parquet: say so in a row, go on
        yield RawImage(shard_error_id(kind, paths[0], root), paths[0], None,
                       f"shard error: {type(exc).__name__}: {exc}")


def _decode_chunk(
    raws: list[RawImage], image_size: int, max_pixels: int, paper_preprocess: bool = False
) -> dict[str, np.ndarray]:
    n = len(raws)
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    errors: list[str | None] = []
    for i, raw in enumerate(raws):
        if raw.error is not None:
            errors.append(raw.error)
            continue
        decoded = decode_image(raw.data, image_size, max_pixels, paper_preprocess)
        raw.data = None
        width[i], height[i] = decoded.width, decoded.height
        if decoded.error is not None:
            errors.append(decoded.error)
        else:
            pixels[i] = decoded.pixels
            errors.append(None)
    return {
        "image_id": np.array([r.image_id for r in raws], dtype=object),
        "source": np.array([r.source for r in raws], dtype=object),
        "width": width,
        "height": height,
        "error": np.array(errors, dtype=object),
        "pixels": pixels,
    }


def error_values(column: Any) -> list[str | None]:
    """An ``error`` column as str-or-None (Ray hands an all-null column back as NaN floats)."""
    return [e if isinstance(e, str) else None for e in column]


def encode_rows(batch: dict[str, np.ndarray], *, rle: bool, class_names: list[str] | None = None) -> pa.Table:
    """Packed label maps (``label_packed``, see pipeline.job.labels) -> the output columns
    (PNG, num_segments, segments) plus bookkeeping. With ``class_names`` (a vocabulary run),
    also each segment's class from ``classes_packed`` and the row's class map."""
    start = time.perf_counter()
    n = len(batch["image_id"])
    label_maps: list[bytes | None] = []
    num_segments: list[int | None] = []
    segments: list[list[dict] | None] = []
    class_maps: list[bytes | None] = []
    errors = error_values(batch["error"])
    for i in range(n):
        packed = batch["label_packed"][i]
        if errors[i] is not None or packed is None or len(packed) == 0:
            label_maps.append(None)
            num_segments.append(None)
            segments.append(None)
            class_maps.append(None)
            if errors[i] is None:
                errors[i] = "model error: no label map was produced"
            continue
        h, w = int(batch["height"][i]), int(batch["width"][i])
        try:
            labels = unpack_label_map(packed, h, w)
            png, k, segs = encode_label(labels, rle)
            class_png_bytes = None
            if class_names is not None:
                class_png_bytes = _name_segments(labels, segs, batch["classes_packed"][i], class_names)
        except Exception as exc:  # noqa: BLE001
            label_maps.append(None)
            num_segments.append(None)
            segments.append(None)
            class_maps.append(None)
            errors[i] = f"encode error: {type(exc).__name__}: {exc}"
            continue
        label_maps.append(png)
        num_segments.append(k)
        segments.append(segs)
        class_maps.append(class_png_bytes)
    per_row = (time.perf_counter() - start) / max(n, 1)
    columns: dict[str, pa.Array] = {
        "image_id": pa.array(list(batch["image_id"]), pa.string()),
        "source": pa.array(list(batch["source"]), pa.string()),
        "width": pa.array(batch["width"], pa.int32()),
        "height": pa.array(batch["height"], pa.int32()),
        "label_map": pa.array(label_maps, pa.binary()),
        "num_segments": pa.array(num_segments, pa.int32()),
        "segments": pa.array(segments, pa.list_(SEGMENT if class_names is None else CLASS_SEGMENT)),
        "error": pa.array(errors, pa.string()),
        SHARD_ID: pa.array(batch[SHARD_ID], pa.int64()),
        SHARD_ROWS: pa.array(batch[SHARD_ROWS], pa.int64()),
    }
    if class_names is not None:
        columns[CLASS_MAP] = pa.array(class_maps, pa.binary())
    for stage in ("decode", "model"):  # what the earlier stages ran with, on to the sink
        column = PROVENANCE[stage]
        columns[column] = pa.array(list(batch[column]) if column in batch else [None] * n, pa.string())
    columns[PROVENANCE["encode"]] = pa.array([encode_provenance(rle=rle, class_names=class_names)] * n, pa.string())
    for col in ("_t_decode", "_t_model", "_t_merge"):
        columns[col] = pa.array(batch[col] if col in batch else np.zeros(n), pa.float64())
    columns["_t_encode"] = pa.array(np.full(n, per_row), pa.float64())
    return pa.table(columns)


def _name_segments(labels: np.ndarray, segs: list[dict], packed: bytes, names: list[str]) -> bytes:
    """Name a row's segments (in place) from the actor's packed classes; return its class-map PNG.

    The actor's classes are indexed by the label map's ids; the stored segments by the
    compacted ids (the same when the map is already compact, as the actor makes it).
    """
    classes, scores = unpack_classes(packed)
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(classes)))
    classes, scores = classes[present], scores[present]
    name_segments(segs, classes, scores, names)
    lut = np.full(int(present[-1]) + 1, UNKNOWN_CLASS, dtype=np.uint8)
    lut[present] = np.where(classes >= 0, classes, UNKNOWN_CLASS)
    return class_png(lut[labels])
