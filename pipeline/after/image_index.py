"""Find and read the source image of a label row by its ``image_id``.

The ids are the pipeline's own (pipeline.data.sources, readers): the path relative to the
input root for image files, ``<shard>/<key>`` for tar and Parquet shards. We
list the input once with the same helper and read with the same readers, so an
id made by ``diffseg label`` always resolves here, wherever the input now lives.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.decode import to_rgb
from pipeline.data.readers import read_image_files, read_source
from pipeline.data.sources import list_inputs, relative_id


@dataclass
class ImageIndex:
    """image_id -> where its bytes are (an image file, or a tar/Parquet shard holding it)."""

    root: str
    files: dict[str, str]  # image_id -> file URI
    containers: dict[str, tuple[str, str]] = field(default_factory=dict)  # shard id -> (kind, URI)
    storage_options: dict[str, Any] | None = None
    image_column: str | None = None

    @classmethod
    def build(
        cls, images_uri: str, storage_options: dict[str, Any] | None = None, image_column: str | None = None
    ) -> "ImageIndex":
        listing = list_inputs(images_uri, storage_options)
        files = {relative_id(u, listing.root): u for u in listing.images}
        containers = {relative_id(u, listing.root): ("tar", u) for u in listing.tars}
        containers.update({relative_id(u, listing.root): ("parquet", u) for u in listing.parquets})
        return cls(listing.root, files, containers, storage_options, image_column)

    def container_of(self, image_id: str) -> str | None:
        """The shard id whose ``<shard>/`` prefixes ``image_id`` (longest match), if any."""
        parts = image_id.split("/")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:cut])
            if prefix in self.containers:
                return prefix
        return None

    def read(self, image_ids: Iterable[str]) -> Iterator[tuple[str, bytes | None, str | None]]:
        """(image_id, bytes, error) for each id, files first then shard by shard (each shard read once)."""
        wanted = list(dict.fromkeys(image_ids))
        in_files = [i for i in wanted if i in self.files]
        by_container: dict[str, set[str]] = {}
        missing = []
        for i in wanted:
            if i in self.files:
                continue
            shard = self.container_of(i)
            if shard is None:
                missing.append(i)
            else:
                by_container.setdefault(shard, set()).add(i)
        for raw in read_image_files([self.files[i] for i in in_files], self.root, self.storage_options):
            yield raw.image_id, raw.data, raw.error
        for shard, ids in by_container.items():
            kind, uri = self.containers[shard]
            try:
                for raw in read_source(kind, [uri], self.root, self.storage_options, self.image_column):
                    if raw.image_id in ids:
                        ids.discard(raw.image_id)
                        yield raw.image_id, raw.data, raw.error
                    if not ids:
                        break
            except Exception as exc:  # noqa: BLE001 - a broken shard: its ids get an error each
                missing_error = f"read error: {type(exc).__name__}: {exc}"
                for i in sorted(ids):
                    yield i, None, missing_error
                continue
            for i in sorted(ids):
                yield i, None, f"not found: no {i!r} in {uri}"
        for i in missing:
            yield i, None, f"not found: no image {i!r} under {self.root}"


def decode_rgb(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 at the image's own size after EXIF orientation (the label's frame)."""
    with Image.open(io.BytesIO(data)) as img:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        return np.asarray(to_rgb(ImageOps.exif_transpose(img)), dtype=np.uint8)


def center_crop_resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Centre-crop ``array`` (H, W[, C]) to the aspect ratio of ``size`` = (h, w), then resize to it.

    For a square ``size`` this is the paper's preprocessing (crop to the short
    side, resize to 512). Nearest keeps label values; it samples pixel centres
    (source index ``floor((i + 0.5) * in / out)``) like PIL's and TF's
    half-pixel nearest. Images use bilinear (PIL). Same size: returned unchanged.
    """
    out_h, out_w = size
    h, w = array.shape[:2]
    if (h, w) == (out_h, out_w):
        return array
    # largest crop with the target's aspect ratio
    if h * out_w > w * out_h:  # too tall
        ch, cw = max(1, round(w * out_h / out_w)), w
    else:
        ch, cw = h, max(1, round(h * out_w / out_h))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = array[top : top + ch, left : left + cw]
    if nearest:
        rows = np.minimum(((np.arange(out_h) + 0.5) * ch / out_h).astype(np.int64), ch - 1)
        cols = np.minimum(((np.arange(out_w) + 0.5) * cw / out_w).astype(np.int64), cw - 1)
        return crop[rows[:, None], cols[None, :]]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((out_w, out_h), Image.Resampling.BILINEAR))
