"""Work shards and resuming: what is left to do in an output folder.

The sorted listing is cut into deterministic work shards (``rows_per_file`` image
files each; one shard per tar or Parquet input). The plan is saved in the output
(``_plan.jsonl.gz``) on the first run and reused by every rerun, so shard ids never
shift; files that appeared since are appended as new shards. A shard is done iff
its marker ``_done/<shard>.json`` exists; anything else a killed run left behind
(``_inprogress/``, parts renamed before the marker was written) is deleted before
the rerun starts.
"""
from __future__ import annotations

import gzip
import json
import posixpath
from dataclasses import dataclass

import fsspec

from pipeline.schema import DONE_DIR, PLAN, TMP_DIR, shard_of_part
from pipeline.sources import Listing, read_literal


@dataclass(frozen=True)
class Shard:
    shard_id: int
    kind: str  # "images", "tar" or "parquet"
    paths: tuple[str, ...]

    def to_json(self) -> dict:
        return {"shard_id": self.shard_id, "kind": self.kind, "paths": list(self.paths)}


def make_shards(listing: Listing, images_per_shard: int, first_id: int = 0) -> list[Shard]:
    shards: list[Shard] = []
    next_id = first_id
    for start in range(0, len(listing.images), images_per_shard):
        shards.append(Shard(next_id, "images", tuple(listing.images[start : start + images_per_shard])))
        next_id += 1
    for kind, paths in (("tar", listing.tars), ("parquet", listing.parquets)):
        for path in paths:
            shards.append(Shard(next_id, kind, (path,)))
            next_id += 1
    return shards


def load_or_make_plan(
    fs: fsspec.AbstractFileSystem, root: str, listing: Listing, images_per_shard: int
) -> tuple[list[Shard], int]:
    """The run's shards: the saved plan plus shards for files not in it. Returns (shards, new shards)."""
    path = f"{root}/{PLAN}"
    saved = read_plan(fs, path)
    if saved is None:
        shards = make_shards(listing, images_per_shard)
        write_plan(fs, path, shards)
        return shards, len(shards)
    planned = {p for shard in saved for p in shard.paths}
    fresh = Listing(
        listing.root,
        [p for p in listing.images if p not in planned],
        [p for p in listing.parquets if p not in planned],
        [p for p in listing.tars if p not in planned],
    )
    added = make_shards(fresh, images_per_shard, first_id=max((s.shard_id for s in saved), default=-1) + 1)
    if added:
        write_plan(fs, path, saved + added)
    return saved + added, len(added)


def read_plan(fs: fsspec.AbstractFileSystem, path: str) -> list[Shard] | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as raw, gzip.open(raw, "rt") as f:
        return [Shard(d["shard_id"], d["kind"], tuple(d["paths"])) for d in map(json.loads, f)]


def write_plan(fs: fsspec.AbstractFileSystem, path: str, shards: list[Shard]) -> None:
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as raw, gzip.open(raw, "wt") as f:
        for shard in shards:
            f.write(json.dumps(shard.to_json()) + "\n")
    fs.mv(tmp, path)


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
