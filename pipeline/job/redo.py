"""``diffseg label --retry-errors KIND...``: redo committed error rows of chosen kinds, in place.

For each committed shard whose marker counts errors of a chosen kind, the rows of
those kinds are read back (``image_id``, ``source``, ``error`` only) and become one
work item: the image files themselves for a folder shard, or the tar / Parquet
file with the ids to keep (``only``). The new rows replace the old ones in a new
generation of the shard's files, committed by a new marker (pipeline/job/commit.py,
``finalize_shard(replace=...)``), so every image is still there exactly once.
A ``#shard-error`` row (the container itself failed) redoes the whole container.
"""
from __future__ import annotations

from typing import Any, Iterable

import fsspec
import pyarrow.parquet as pq

from pipeline.data.resume import Shard
from pipeline.job.sink import error_kind

SHARD_ERROR_SUFFIX = "/#shard-error"


def rows_to_retry(
    fs: fsspec.AbstractFileSystem, root: str, markers: dict[int, dict], kinds: Iterable[str]
) -> dict[int, list[tuple[str, str]]]:
    """{shard_id: [(image_id, source), ...]} of committed rows whose error kind is one of ``kinds``."""
    kinds = set(kinds)
    found: dict[int, list[tuple[str, str]]] = {}
    for shard_id, marker in sorted(markers.items()):
        if not kinds & set(marker.get("errors", {})):
            continue
        for name in marker.get("files", []):
            with fs.open(f"{root}/{name}", "rb") as f:
                table = pq.read_table(f, columns=["image_id", "source", "error"])
            for image_id, source, error in zip(*(table.column(c).to_pylist() for c in table.column_names)):
                if error is not None and error_kind(error) in kinds:
                    found.setdefault(shard_id, []).append((image_id, source))
    return found


def retry_item(shard: Shard, rows: list[tuple[str, str]]) -> dict[str, Any]:
    """The work item (read_decode's input row) that re-reads just ``rows`` of ``shard``."""
    ids = [image_id for image_id, _ in rows]
    if shard.kind == "images":
        return {"shard_id": shard.shard_id, "kind": "images", "paths": sorted({source for _, source in rows}),
                "only": None}
    if any(i.endswith(SHARD_ERROR_SUFFIX) for i in ids):
        return {"shard_id": shard.shard_id, "kind": shard.kind, "paths": list(shard.paths), "only": None}
    return {"shard_id": shard.shard_id, "kind": shard.kind, "paths": list(shard.paths), "only": sorted(ids)}
