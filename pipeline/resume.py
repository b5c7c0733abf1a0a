"""Work shards and resuming: what is left to do in an output folder.

The input listing is cut into deterministic work shards (``rows_per_file`` image
files each; one shard per tar or Parquet input). The plan is saved in the output
(``_plan.jsonl.gz``, one JSON line per shard) on the first run and reused by every
rerun, so shard ids never shift; files that appeared since are appended as new
shards. A shard is done iff its marker ``_done/<shard>.json`` exists; anything else
a killed run left behind (``_inprogress/``, parts renamed before the marker was
written) is deleted before the rerun starts.

Everything here streams: the listing is cut into shards and written as it comes,
and a rerun remembers which files the saved plan holds as 16-byte digests (16 MB
for a million files), never as a Python object per file.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from itertools import islice
from typing import IO, Iterable, Iterator

import fsspec
import numpy as np

from pipeline.schema import DONE_DIR, PLAN, TMP_DIR, shard_of_part
from pipeline.sources import read_literal

_DIGEST = 16


class DamagedPlanError(ValueError):
    """The saved plan cannot be read; it cannot be rebuilt without risking a shard labelled twice."""


@dataclass(frozen=True)
class Shard:
    shard_id: int
    kind: str  # "images", "tar" or "parquet"
    paths: tuple[str, ...]

    def to_json(self) -> dict:
        return {"shard_id": self.shard_id, "kind": self.kind, "paths": list(self.paths)}


@dataclass(frozen=True)
class PlanSummary:
    shards: int  # shards in the plan, old and new
    new: int  # shards this run added (all of them on a first run)


def shards_from_inputs(inputs: Iterable[tuple[str, str]], images_per_shard: int, first_id: int = 0) -> Iterator[Shard]:
    """Cut a stream of ``(kind, uri)`` into shards, in order: image files ``images_per_shard``
    at a time, each tar or Parquet file a shard of its own. Holds one shard's paths at most."""
    next_id = first_id
    images: list[str] = []
    for kind, uri in inputs:
        if kind == "image":
            images.append(uri)
            if len(images) == images_per_shard:
                yield Shard(next_id, "images", tuple(images))
                next_id, images = next_id + 1, []
        else:
            yield Shard(next_id, kind, (uri,))
            next_id += 1
    if images:
        yield Shard(next_id, "images", tuple(images))


def update_plan(
    fs: fsspec.AbstractFileSystem, root: str, inputs: Iterable[tuple[str, str]], images_per_shard: int
) -> PlanSummary:
    """Make the plan, or append shards for inputs the saved plan does not hold; streaming both ways."""
    path = f"{root}/{PLAN}"
    if not fs.exists(path):
        with _replacing(fs, path) as out:
            count = _write_shards(out, shards_from_inputs(inputs, images_per_shard))
        return PlanSummary(count, count)
    planned = PlannedPaths.of_plan(fs, path)
    fresh = planned.not_in(inputs)
    with tempfile.TemporaryFile() as spool:  # new shards, as one more gzip member of the plan
        added = _write_shards(spool, shards_from_inputs(fresh, images_per_shard, first_id=planned.next_id))
        if added:
            spool.seek(0)
            with _replacing(fs, path) as out:
                with fs.open(path, "rb") as old:
                    shutil.copyfileobj(old, out, 1 << 22)
                shutil.copyfileobj(spool, out, 1 << 22)
    return PlanSummary(planned.shards + added, added)


def iter_plan(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[Shard]:
    """The saved plan's shards, streamed. Raises DamagedPlanError for a torn or foreign file."""
    path = f"{root}/{PLAN}"
    try:
        with fs.open(path, "rb") as raw, gzip.open(raw, "rt") as f:
            for line in f:
                d = json.loads(line)
                yield Shard(int(d["shard_id"]), str(d["kind"]), tuple(d["paths"]))
    except (EOFError, gzip.BadGzipFile, ValueError, KeyError, TypeError) as exc:
        raise DamagedPlanError(
            f"the shard plan {path} is damaged ({type(exc).__name__}); rerun with --overwrite to start over"
        ) from None


class PlannedPaths:
    """Which input files a saved plan holds: sorted 16-byte digests of their URIs."""

    def __init__(self, digests: np.ndarray, shards: int, next_id: int):
        self.digests = digests
        self.shards = shards
        self.next_id = next_id

    @classmethod
    def of_plan(cls, fs: fsspec.AbstractFileSystem, path: str) -> "PlannedPaths":
        buf = bytearray()
        shards, last = 0, -1
        for shard in iter_plan(fs, posixpath.dirname(path)):
            shards += 1
            last = max(last, shard.shard_id)
            for p in shard.paths:
                buf += _digest(p)
        digests = np.sort(np.frombuffer(bytes(buf), dtype=f"S{_DIGEST}"))
        return cls(digests, shards, last + 1)

    def not_in(self, inputs: Iterable[tuple[str, str]], chunk: int = 8192) -> Iterator[tuple[str, str]]:
        """The inputs whose URI the plan does not hold, in their order."""
        it = iter(inputs)
        while batch := list(islice(it, chunk)):
            keys = np.frombuffer(b"".join(_digest(uri) for _, uri in batch), dtype=f"S{_DIGEST}")
            at = np.searchsorted(self.digests, keys)
            found = (at < len(self.digests)) & (self.digests[np.minimum(at, len(self.digests) - 1)] == keys)
            yield from (item for item, known in zip(batch, found) if not known)


def _digest(uri: str) -> bytes:
    return hashlib.blake2b(uri.encode(), digest_size=_DIGEST).digest()


def _write_shards(out: IO[bytes], shards: Iterable[Shard]) -> int:
    count = 0
    with gzip.open(out, "wt") as f:
        for shard in shards:
            f.write(json.dumps(shard.to_json()) + "\n")
            count += 1
    return count


class _replacing:
    """Write ``path`` under a temporary name and move it into place only when complete."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.fs, self.path = fs, path
        self.tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"

    def __enter__(self) -> IO[bytes]:
        self.file = self.fs.open(self.tmp, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        if exc_type is None:
            self.fs.mv(self.tmp, self.path)
        elif self.fs.exists(self.tmp):
            self.fs.rm(self.tmp)


def done_shards(fs: fsspec.AbstractFileSystem, root: str) -> set[int]:
    """Ids of shards whose completion marker exists."""
    done_dir = f"{root}/{DONE_DIR}"
    if not fs.exists(done_dir):
        return set()
    out = set()
    for p in fs.ls(done_dir, detail=False):
        stem = posixpath.basename(p).split(".")[0]
        if stem.isdigit() and p.endswith(".json"):
            out.add(int(stem))
    return out


def read_markers(fs: fsspec.AbstractFileSystem, root: str) -> list[dict]:
    """Every committed shard's marker (one batched read)."""
    done_dir = f"{root}/{DONE_DIR}"
    if not fs.exists(done_dir):
        return []
    paths = [p for p in fs.ls(done_dir, detail=False) if p.endswith(".json")]
    if not paths:
        return []
    contents = read_literal(fs, sorted(paths))  # never fs.cat: it reads "out[2]/..." as a glob
    for data in contents:
        if isinstance(data, BaseException):
            raise data
    return [json.loads(data) for data in contents]


def clean_uncommitted(fs: fsspec.AbstractFileSystem, root: str, done: set[int]) -> list[str]:
    """Delete what a killed run left behind: temp parts and parts of shards without a marker."""
    removed = []
    tmp = f"{root}/{TMP_DIR}"
    if fs.exists(tmp):
        removed.extend(fs.find(tmp))
        fs.rm(tmp, recursive=True)
    if fs.exists(root):
        for p in fs.ls(root, detail=False):
            shard_id = shard_of_part(p)
            if shard_id is not None and shard_id not in done:
                fs.rm(p)
                removed.append(p)
    return removed
