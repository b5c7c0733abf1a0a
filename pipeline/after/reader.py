"""Train on pseudo-labels: (image, label map) pairs joined from the source images and the label shards.

* :class:`PseudoLabelDataset`, a ``torch.utils.data.IterableDataset``. Every
  (rank, DataLoader worker) pair reads a disjoint share, so across all ranks and
  workers each labelled image is yielded exactly once per epoch. Error rows are
  skipped. ``shard_by="row"`` (default) deals rows round-robin: balanced, and
  right for image files, which are read one by one. ``shard_by="file"`` deals
  whole label files: use it when the images sit in tar/Parquet shards, so each
  such shard is streamed by one worker only (labels of one input shard are in
  the same label files).
* :func:`ray_dataset`, the same pairs as a ``ray.data.Dataset``
  (columns ``image_id``, ``image`` (H, W, 3) uint8, ``label`` (H, W) int64).

``target="class_map"`` (labels made with ``--vocabulary``) yields each image's
class map instead of its segment ids: the vocabulary index per pixel, the same
class in every image, 255 where unknown (``ignore_index=255`` for cross-entropy).

Images are decoded at their own size after EXIF orientation, the frame the
labels were made in. A label of another size (e.g. made on a centre crop) gets
the image centre-cropped and resized to it. ``size`` resizes both (the image
bilinear, the label nearest) so that a DataLoader can stack a batch.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from pipeline.after.image_index import ImageIndex, center_crop_resize, decode_rgb
from pipeline.data.label_files import (
    arrow_filesystem,
    class_map,
    committed_label_files,
    is_error,
    label_map,
)
from pipeline.data.sources import open_fs

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError:  # pragma: no cover - torch is a dependency; keep the Ray path importable anyway
    torch = None
    IterableDataset = object  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)
READ_COLUMNS = ("image_id", "label_map", "error")
TARGETS = {"label_map": label_map, "class_map": class_map}  # what a pair's labels are


def _target(target: str) -> tuple[list[str], Callable[[dict[str, Any]], np.ndarray]]:
    """(columns to read, row -> (H, W) int64 map) for ``target``."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    columns = list(READ_COLUMNS) + ([target] if target not in READ_COLUMNS else [])
    return columns, TARGETS[target]


def _as_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def make_pair(data: bytes, labels: np.ndarray, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode an image and bring it and its label map to one frame: (H, W, 3) uint8, (H, W) int64."""
    image = decode_rgb(data)
    if image.shape[:2] != labels.shape:
        image = center_crop_resize(image, labels.shape, nearest=False)
    if size is not None:
        image = center_crop_resize(image, size, nearest=False)
        labels = center_crop_resize(labels, size, nearest=True)
    return image, labels


def default_transform(image: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
    """(3, H, W) float32 in [0, 1] and (H, W) int64 tensors."""
    img = torch.from_numpy(np.array(image, dtype=np.uint8, order="C")).permute(2, 0, 1).float().div_(255.0)
    return img, torch.from_numpy(np.array(labels, dtype=np.int64, order="C"))


class PseudoLabelDataset(IterableDataset):
    """(image, label map) pairs of the committed, error-free rows under ``labels_uri``.

    ``rank``/``world_size`` default to torch.distributed's when it is initialised,
    else 0/1. ``transform(image_uint8_hwc, labels_int64_hw)`` replaces the default
    conversion to tensors; ``return_id=True`` yields (image_id, image, label). The image index (one listing of ``images_uri``) and the
    label files' row counts are read once, here, and shipped to the workers.
    ``target``: ``"label_map"`` (segment ids) or ``"class_map"`` (classes; labels made with a vocabulary).
    """

    def __init__(
        self,
        labels_uri: str,
        images_uri: str,
        *,
        size: int | tuple[int, int] | None = None,
        transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        shard_by: str = "row",
        return_id: bool = False,
        storage_options: dict[str, Any] | None = None,
        image_column: str | None = None,
        target: str = "label_map",
    ) -> None:
        self.columns, self.target = _target(target)
        if shard_by not in ("row", "file"):
            raise ValueError(f"shard_by must be 'row' or 'file', not {shard_by!r}")
        if rank is None or world_size is None:
            dist = torch.distributed if torch is not None else None
            if dist is not None and dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
            else:
                rank, world_size = 0, 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size, self.shard_by = int(rank), int(world_size), shard_by
        self.size = _as_size(size)
        self.return_id = return_id
        self.transform = transform or default_transform
        self.storage_options = storage_options
        self.files = committed_label_files(labels_uri, storage_options)
        if target == "class_map":
            _check_class_maps(labels_uri, self.files, storage_options)
        self.row_groups = [_row_group_sizes(f, storage_options) for f in self.files]
        self.index = ImageIndex.build(images_uri, storage_options, image_column)

    def _slot(self) -> tuple[int, int]:
        """(this reader's id, number of readers) over ranks x DataLoader workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _my_rows(self) -> Iterator[tuple[int, int, list[int]]]:
        """(file, row group, row indexes in it) this reader owns."""
        me, readers = self._slot()
        base = 0
        for f, sizes in enumerate(self.row_groups):
            for rg, n in enumerate(sizes):
                if self.shard_by == "file":
                    rows = list(range(n)) if f % readers == me else []
                else:
                    first = (me - base) % readers
                    rows = list(range(first, n, readers))
                base += n
                if rows:
                    yield f, rg, rows

    def __iter__(self) -> Iterator[Any]:
        for f, rg, rows in self._my_rows():
            fs, path = open_fs(self.files[f], self.storage_options)
            with fs.open(path, "rb") as fh:
                table = pq.ParquetFile(fh).read_row_group(rg, columns=self.columns)
            for image_id, image, labels in join_pairs(self.index, table.take(rows).to_pylist(), self.size,
                                                      self.target):
                pair = self.transform(image, labels)
                yield (image_id, *pair) if self.return_id else pair


def join_pairs(
    index: ImageIndex, records: list[dict[str, Any]], size: tuple[int, int] | None,
    labels_of: Callable[[dict[str, Any]], np.ndarray] = label_map,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(image_id, image, labels) for each ok label row: every row its own pair, ids matched
    exactly (an id is text, never a pattern); a source image that is missing or does not
    decode is skipped with a warning. ``labels_of(row)``: the row's segment ids, or its class map."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if not is_error(r):
            by_id.setdefault(r["image_id"], []).append(r)
    for image_id, data, error in index.read(by_id):
        if data is None:
            logger.warning("skipping %s: %s", image_id, error)
            continue
        for row in by_id[image_id]:
            try:
                image, labels = make_pair(data, labels_of(row), size)
            except Exception as exc:  # noqa: BLE001 - an undecodable source image: skip it
                logger.warning("skipping %s: %s: %s", image_id, type(exc).__name__, exc)
                continue
            yield image_id, image, labels


def _check_class_maps(labels_uri: str, files: list[str], storage_options: dict[str, Any] | None) -> None:
    """ValueError when the label files hold no class maps (labels made without a vocabulary)."""
    fs, path = open_fs(files[0], storage_options)
    with fs.open(path, "rb") as f:
        if "class_map" not in pq.ParquetFile(f).schema_arrow.names:
            raise ValueError(f"{labels_uri} holds no class maps: label with --vocabulary to train on classes")


def _row_group_sizes(uri: str, storage_options: dict[str, Any] | None) -> list[int]:
    fs, path = open_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


class _JoinImages:
    """Ray Data callable class: label rows -> (image_id, image, label) rows; holds the image index once."""

    def __init__(self, index: ImageIndex, size: tuple[int, int] | None, target: str = "label_map") -> None:
        self.index, self.size = index, size
        _, self.target = _target(target)

    def __call__(self, batch: Any) -> dict[str, list]:
        out: dict[str, list] = {"image_id": [], "image": [], "label": []}
        for image_id, image, labels in join_pairs(self.index, batch.to_pylist(), self.size, self.target):
            out["image_id"].append(image_id)
            out["image"].append(image)
            out["label"].append(labels)
        return out


def ray_dataset(
    labels_uri: str,
    images_uri: str,
    *,
    size: int | tuple[int, int] | None = None,
    concurrency: int = 1,
    batch_size: int = 32,
    storage_options: dict[str, Any] | None = None,
    image_column: str | None = None,
    target: str = "label_map",
):
    """A lazy ``ray.data.Dataset`` of the pairs (columns image_id, image, label).

    Uses the Ray this process has initialised; otherwise starts a local one (or joins
    ``RAY_ADDRESS`` when it names a cluster), never a stale cluster a plain ``ray.init()``
    would find. ``target="class_map"``: ``label`` is the class map (labels made with a vocabulary)."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.ray_connect import init_ray

    init_ray(None, include_dashboard=False)

    columns, _ = _target(target)
    files = committed_label_files(labels_uri, storage_options)
    if target == "class_map":
        _check_class_maps(labels_uri, files, storage_options)
    index = ImageIndex.build(images_uri, storage_options, image_column)
    filesystem, paths = arrow_filesystem(files, storage_options)
    ds = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(columns)
    return ds.map_batches(
        _JoinImages, fn_constructor_kwargs={"index": index, "size": _as_size(size), "target": target},
        batch_size=batch_size,
        batch_format="pyarrow", compute=ActorPoolStrategy(size=concurrency), num_cpus=1,
    )


def iter_pairs(labels_uri: str, images_uri: str, **kwargs: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Plain-numpy pairs in one process (for scripts and notebooks): ``PseudoLabelDataset`` without torch tensors."""
    yield from PseudoLabelDataset(labels_uri, images_uri, transform=lambda i, l: (i, l), **kwargs)


__all__ = ["PseudoLabelDataset", "ray_dataset", "iter_pairs", "make_pair", "default_transform"]
