"""Label maps on their way from the model actor to the encode stage.

The actor's device computes each image's label map at the image's own size
(core's banded NMS and compaction, :meth:`diffseg_core.segmentor.DiffSeg.label_maps`);
here the batch's maps come back to the host in one copy, as uint8 when every
image has at most 256 proposals (uint16 otherwise), and are packed with zstd for
the object store. A label map is long runs of a few values: a 512 x 512 map
packs to tens of KB (its raw uint16 was 512 KB, a 12-megapixel photo's 24 MB).
The encode stage unpacks it and writes the PNG.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

#: Segment ids must fit the 16-bit PNG the sink writes.
MAX_SEGMENTS = 1 << 16

CODEC = "zstd"
_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16)}


def labels_to_host(maps: list[torch.Tensor], num_labels: list[int]) -> list[np.ndarray]:
    """Integer (H_i, W_i) label maps with values below ``num_labels[i]``, on any device ->
    uint8 (every ``num_labels`` <= 256) or uint16 numpy arrays, in one device-to-host copy."""
    if len(maps) != len(num_labels):
        raise ValueError(f"{len(maps)} label maps but {len(num_labels)} label counts")
    if not maps:
        return []
    most = max(num_labels)
    if most > MAX_SEGMENTS:
        raise ValueError(f"{most} proposals do not fit a 16-bit label map")
    small = most <= 256
    flat = torch.cat([m.reshape(-1).to(torch.uint8 if small else torch.int32) for m in maps])
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
    else:
        host = flat.cpu()
    values = host.numpy()
    if not small:
        values = values.astype(np.uint16)
    out, start = [], 0
    for m in maps:
        h, w = m.shape
        out.append(values[start : start + h * w].reshape(h, w))
        start += h * w
    return out


def pack_label_map(labels: np.ndarray) -> bytes:
    """A uint8 or uint16 (H, W) label map -> bytes for the object store: one byte of item size, then zstd."""
    if labels.dtype not in (np.uint8, np.uint16) or labels.ndim != 2:
        raise ValueError(f"expected a uint8 or uint16 (H, W) label map, got {labels.dtype} {labels.shape}")
    return bytes([labels.itemsize]) + pa.compress(np.ascontiguousarray(labels), codec=CODEC, asbytes=True)


def unpack_label_map(data: bytes, height: int, width: int) -> np.ndarray:
    """Inverse of `pack_label_map`, given the map's size: a read-only uint8 or uint16 (H, W) array."""
    dtype = _DTYPES.get(data[0]) if len(data) else None
    if dtype is None:
        raise ValueError("not a packed label map")
    raw = pa.decompress(memoryview(data)[1:], decompressed_size=height * width * dtype.itemsize, codec=CODEC,
                        asbytes=True)
    return np.frombuffer(raw, dtype=dtype).reshape(height, width)


def pack_classes(classes: np.ndarray, scores: np.ndarray) -> bytes:
    """Per segment id: vocabulary index (-1 unknown) and class score -> bytes for the object store."""
    classes, scores = np.asarray(classes), np.asarray(scores)
    if classes.shape != scores.shape or classes.ndim != 1:
        raise ValueError(f"classes {classes.shape} and scores {scores.shape} must be one value per segment")
    return classes.astype("<i2").tobytes() + scores.astype("<f4").tobytes()


def unpack_classes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack_classes`: (int64 classes, float32 scores)."""
    if len(data) % 6:
        raise ValueError("not packed classes")
    k = len(data) // 6
    classes = np.frombuffer(data, dtype="<i2", count=k).astype(np.int64)
    scores = np.frombuffer(data, dtype="<f4", count=k, offset=2 * k).astype(np.float32)
    return classes, scores
