"""Read a labeling job's output: the committed Parquet parts and their rows.

Only *committed* parts are read: in an output of ``diffseg label`` (it has a
``_manifest.json``, ``_plan.jsonl.gz``, ``_lease.json`` or ``_done/``), a part counts only
if its shard's marker lists it (no marker yet: nothing is committed), so the rows of a
killed run's unfinished shard and a replaced generation's files are never evaluated,
exported or trained on. A committed file whose move to the root has not happened yet
is read from ``_staged/<shard>/``. Other files under ``_``/``.`` folders are skipped.
"""
from __future__ import annotations

import posixpath
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from pipeline.data.encode import decode_png
from pipeline.data.resume import read_markers
from pipeline.data.schema import DONE_DIR, LEASE, MANIFEST, PLAN, shard_of_part, staged_path
from pipeline.data.sources import open_fs

ROW_COLUMNS = ("image_id", "source", "width", "height", "label_map", "num_segments", "error")


class NoLabelsError(RuntimeError):
    """No committed label Parquet file under the given URL."""


def committed_label_files(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted URIs of the committed Parquet parts under ``uri`` (a folder or one .parquet file)."""
    fs, root = open_fs(uri, storage_options)
    root = root.rstrip("/") or root
    if root.endswith(".parquet") and fs.isfile(root):
        return [fs.unstrip_protocol(root)]
    if not fs.isdir(root):
        raise NoLabelsError(f"No labels at {uri!r}: not a folder or a .parquet file.")
    found = fs.find(root)
    files = [
        p for p in found
        if p.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in _relative(p, root).split("/"))
    ]
    if any(fs.exists(f"{root}/{name}") for name in (DONE_DIR, MANIFEST, PLAN, LEASE)):
        markers, _ = read_markers(fs, root)  # none yet: nothing is committed
        files = [p for p in files if shard_of_part(p) is None or _listed(markers.get(shard_of_part(p)), p)]
        present = set(found)
        for shard_id, marker in markers.items():  # committed, not yet moved to the root
            for name in marker.get("files", []):
                staged = f"{root}/{staged_path(shard_id, name)}"
                if f"{root}/{name}" not in present and staged in present:
                    files.append(staged)
    if not files:
        raise NoLabelsError(f"No committed label Parquet files under {uri!r}.")
    return [fs.unstrip_protocol(p) for p in sorted(files)]


def _listed(marker: dict | None, path: str) -> bool:
    """A part is committed when its shard has a marker that lists it (markers without a list: all)."""
    return marker is not None and ("files" not in marker or posixpath.basename(path) in marker["files"])


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else posixpath.basename(path)


def iter_label_batches(
    files: Sequence[str],
    columns: Sequence[str] = ROW_COLUMNS,
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 256,
) -> Iterator[list[dict[str, Any]]]:
    """Rows of the label files as lists of dicts (only ``columns``), a bounded batch at a time."""
    for uri in files:
        fs, path = open_fs(uri, storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            present = [c for c in columns if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=batch_size, columns=present):
                yield batch.to_pylist()


def label_map(row: dict[str, Any]) -> np.ndarray:
    """The (H, W) int64 segment-id map of an ok row."""
    return decode_png(row["label_map"])


def class_map(row: dict[str, Any]) -> np.ndarray:
    """The (H, W) int64 class map of an ok row labelled with a vocabulary (255 = unknown)."""
    data = row.get("class_map")
    if data is None:
        raise ValueError(f"{row.get('image_id')}: no class map (label with --vocabulary to get class maps)")
    return decode_png(data)


def vocabulary_names(labels: str, storage_options: dict[str, Any] | None = None) -> list[str] | None:
    """The class names the labels under ``labels`` were made with (index = class-map value), or
    None when they were made without a vocabulary: from ``_manifest.json``, else from the first
    label file's key-value metadata."""
    import json

    from pipeline.data.manifest import read_labels_manifest
    from pipeline.data.schema import METADATA_KEY

    manifest = read_labels_manifest(labels, storage_options)
    vocab = (manifest or {}).get("vocabulary")
    if vocab is None and manifest is None:
        files = committed_label_files(labels, storage_options)
        fs, path = open_fs(files[0], storage_options)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        try:
            vocab = json.loads(meta.get(METADATA_KEY, b"{}")).get("vocabulary")
        except ValueError:
            vocab = None
    return list(vocab["names"]) if isinstance(vocab, dict) and vocab.get("names") else None


def is_error(row: dict[str, Any]) -> bool:
    """A row with no label (its ``error`` says why)."""
    return row.get("error") is not None or row.get("label_map") is None


def arrow_filesystem(files: Sequence[str], storage_options: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """(pyarrow filesystem or None for local files, protocol-less paths): what Ray's read_parquet takes."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = open_fs(files[0], storage_options)
    paths = [fs._strip_protocol(f) for f in files]
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return None, paths
    return PyFileSystem(FSSpecHandler(fs)), paths
