"""Work shards and resuming: what is left to do in an output folder.

The input listing is cut into deterministic work shards (``rows_per_file`` image
files each; one shard per tar or Parquet input). The plan is saved in the output
(``_plan.jsonl.gz``) on the first run and reused by every rerun, so shard ids never
shift; files that appeared since are appended as new shards. A shard is done iff
its marker ``_done/<shard>.json`` exists (and parses). A shard's files are staged under
``_staged/<shard>/`` before its marker and moved to the root after it (``publish``): a
rerun first deletes root files its marker does not list (an older generation, files of
a shard without a marker), then moves a committed shard's staged files in (the move a
kill cut short, rolled forward), then deletes everything else a killed run left behind
(``_inprogress/``, uncommitted staged files, torn markers and their temp files). A torn plan is rebuilt from the listing; a committed shard is kept
only if its files hold exactly the inputs of the rebuilt shard of the same id.

Everything here streams, so a driver plans millions of images in constant memory:
the listing is cut into shards and written as it comes; a rerun remembers which
files the saved plan holds as 16-byte digests (16 MB for a million files), never
as a Python object per file. The plan file is gzip-compressed JSON lines, each
shard its own gzip member (``gzip.open`` reads it as one file), after a header
member ``{"diffseg_plan": 2}``: a shard's (offset, length) in the file is all the
driver keeps, and the Ray task that reads a shard's images reads its paths there.
Plans written before (one gzip member for all lines) are converted on first use.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import posixpath
import shutil
import tempfile
import uuid
import zlib
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Callable, Iterable, Iterator

import fsspec
import numpy as np

from pipeline.data.parts import Part
from pipeline.data.retry import RetryPolicy, call_with_retries
from pipeline.data.schema import DONE_DIR, PLAN, STAGED_DIR, TMP_DIR, marker_name, shard_of_part, staged_path
from pipeline.data.readers import read_literal
from pipeline.data.storage import remove

logger = logging.getLogger(__name__)

_DIGEST = 16
_HEADER = gzip.compress(b'{"diffseg_plan": 2}\n', mtime=0)


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
class PlanIndex:
    """Where each shard lies in the plan file: three int64 arrays, 24 bytes per shard."""

    shard_ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.shard_ids)

    def without(self, done: set[int]) -> "PlanIndex":
        keep = ~np.isin(self.shard_ids, np.fromiter(done, dtype=np.int64, count=len(done)))
        return PlanIndex(self.shard_ids[keep], self.offsets[keep], self.lengths[keep])


@dataclass(frozen=True)
class PlanSummary:
    shards: int  # shards in the plan, old and new
    new: int  # shards this run added (all of them on a first run)
    index: PlanIndex = field(repr=False)


def shards_from_inputs(inputs: Iterable[tuple[str, str]], images_per_shard: int, first_id: int = 0,
                       step: int = 1) -> Iterator[Shard]:
    """Cut a stream of ``(kind, uri)`` into shards, in order: image files ``images_per_shard``
    at a time, each tar or Parquet file a shard of its own. Holds one shard's paths at most.
    Ids run ``first_id, first_id + step, ...`` (a part of N takes every N-th id: pipeline/data/parts.py)."""
    next_id = first_id
    images: list[str] = []
    for kind, uri in inputs:
        if kind == "image":
            images.append(uri)
            if len(images) == images_per_shard:
                yield Shard(next_id, "images", tuple(images))
                next_id, images = next_id + step, []
        else:
            yield Shard(next_id, kind, (uri,))
            next_id += step
    if images:
        yield Shard(next_id, "images", tuple(images))


def update_plan(
    fs: fsspec.AbstractFileSystem, root: str, inputs: Iterable[tuple[str, str]], images_per_shard: int,
    part: Part = Part.whole(),
) -> PlanSummary:
    """Make the plan (of ``part``), or append shards for inputs the saved plan does not hold;
    streaming both ways."""
    path = f"{root}/{part.plan_name}"
    if not fs.exists(path):
        with _replacing(fs, path) as out:
            index = _write_shards(out, shards_from_inputs(inputs, images_per_shard, part.first_shard_id(),
                                                          part.count), header=True)
        return PlanSummary(len(index), len(index), index)
    planned = PlannedPaths.of_plan(fs, path)
    fresh = planned.not_in(inputs)
    first = int(planned.index.shard_ids.max()) + part.count if planned.shards else part.first_shard_id()
    new = shards_from_inputs(fresh, images_per_shard, first_id=first, step=part.count)
    if planned.legacy:  # one gzip member for every line: rewrite as one member per shard
        with _replacing(fs, path) as out:
            index = _write_shards(out, _chain(iter_plan(fs, root, part.plan_name), new), header=True)
        return PlanSummary(len(index), len(index) - planned.shards, index)
    with tempfile.TemporaryFile() as spool:  # the new shards, as more members after the saved ones
        added = _write_shards(spool, new, header=False, start=fs.size(path))
        if len(added):
            spool.seek(0)
            with _replacing(fs, path) as out:
                with fs.open(path, "rb") as old:
                    shutil.copyfileobj(old, out, 1 << 22)
                shutil.copyfileobj(spool, out, 1 << 22)
    index = planned.index
    if len(added):
        index = PlanIndex(*(np.concatenate([a, b]) for a, b in zip(
            (index.shard_ids, index.offsets, index.lengths), (added.shard_ids, added.offsets, added.lengths))))
    return PlanSummary(planned.shards + len(added), len(added), index)


def iter_plan(fs: fsspec.AbstractFileSystem, root: str, plan_name: str = PLAN) -> Iterator[Shard]:
    """The saved plan's shards, streamed (either format). Raises DamagedPlanError for a torn or foreign file."""
    path = f"{root}/{plan_name}"
    try:
        with fs.open(path, "rb") as raw, gzip.open(raw, "rt") as f:
            for line in f:
                d = json.loads(line)
                if "diffseg_plan" not in d:
                    yield Shard(int(d["shard_id"]), str(d["kind"]), tuple(d["paths"]))
    except (EOFError, gzip.BadGzipFile, zlib.error, ValueError, KeyError, TypeError) as exc:
        raise _damaged(path, exc) from None


def read_shard(fs: fsspec.AbstractFileSystem, path: str, offset: int, length: int) -> Shard:
    """One shard of a plan file, by its place in it (what a Ray task reads; see plan.shard_dataset)."""
    with fs.open(path, "rb") as f:
        f.seek(offset)
        d = json.loads(gzip.decompress(f.read(length)))
    return Shard(int(d["shard_id"]), str(d["kind"]), tuple(d["paths"]))


class PlannedPaths:
    """What a saved plan holds: sorted 16-byte digests of its URIs, and where each shard lies."""

    def __init__(self, digests: np.ndarray, index: PlanIndex, legacy: bool):
        self.digests = digests
        self.index = index
        self.legacy = legacy
        self.shards = len(index)

    @classmethod
    def of_plan(cls, fs: fsspec.AbstractFileSystem, path: str) -> "PlannedPaths":
        buf = bytearray()
        ids, offsets, lengths = [], [], []
        legacy = False
        try:
            with fs.open(path, "rb") as raw:
                for offset, length, text in _members(raw):
                    lines = text.splitlines()
                    if offset == 0 and lines[:1] != [b'{"diffseg_plan": 2}']:
                        legacy = True
                    for line in lines:
                        d = json.loads(line)
                        if "diffseg_plan" in d:
                            continue
                        ids.append(int(d["shard_id"]))
                        offsets.append(offset)
                        lengths.append(length)
                        for p in d["paths"]:
                            buf += _digest(p)
        except (EOFError, zlib.error, ValueError, KeyError, TypeError) as exc:
            raise _damaged(path, exc) from None
        digests = np.frombuffer(buf, dtype=f"S{_DIGEST}")  # a view of buf: sorted in place, no copy
        digests.sort()
        index = PlanIndex(*(np.asarray(a, dtype=np.int64) for a in (ids, offsets, lengths)))
        return cls(digests, index, legacy)

    def not_in(self, inputs: Iterable[tuple[str, str]], chunk: int = 8192) -> Iterator[tuple[str, str]]:
        """The inputs whose URI the plan does not hold, in their order."""
        it = iter(inputs)
        while batch := list(islice(it, chunk)):
            keys = np.frombuffer(b"".join(_digest(uri) for _, uri in batch), dtype=f"S{_DIGEST}")
            if not len(self.digests):
                yield from batch
                continue
            at = np.minimum(np.searchsorted(self.digests, keys), len(self.digests) - 1)
            found = self.digests[at] == keys
            yield from (item for item, known in zip(batch, found) if not known)


def _members(raw: IO[bytes], chunk: int = 1 << 20) -> Iterator[tuple[int, int, bytes]]:
    """(offset, compressed length, text) of each gzip member of a stream, in order."""
    offset, used, parts = 0, 0, []
    inflate = zlib.decompressobj(31)
    pending = b""
    while True:
        if not pending:
            pending = raw.read(chunk)
            if not pending:
                break
        parts.append(inflate.decompress(pending))
        if inflate.eof:
            used += len(pending) - len(inflate.unused_data)
            yield offset, used, b"".join(parts)
            offset, used, parts = offset + used, 0, []
            pending = inflate.unused_data
            inflate = zlib.decompressobj(31)
        else:
            used += len(pending)
            pending = b""
    if used or any(parts):
        raise EOFError("the last gzip member is cut short")


def _damaged(path: str, exc: BaseException) -> DamagedPlanError:
    return DamagedPlanError(
        f"the shard plan {path} is damaged ({type(exc).__name__}); rerun with --overwrite to start over"
    )


def _chain(*iterables: Iterable[Shard]) -> Iterator[Shard]:
    for it in iterables:
        yield from it


def _digest(uri: str) -> bytes:
    return hashlib.blake2b(uri.encode(), digest_size=_DIGEST).digest()


def _write_shards(out: IO[bytes], shards: Iterable[Shard], *, header: bool, start: int = 0) -> PlanIndex:
    """Write one gzip member per shard; return where each went (offsets from ``start``)."""
    ids, offsets, lengths = [], [], []
    position = start
    if header:
        out.write(_HEADER)
        position += len(_HEADER)
    for shard in shards:
        member = gzip.compress((json.dumps(shard.to_json()) + "\n").encode(), mtime=0)
        out.write(member)
        ids.append(shard.shard_id)
        offsets.append(position)
        lengths.append(len(member))
        position += len(member)
    return PlanIndex(*(np.asarray(a, dtype=np.int64) for a in (ids, offsets, lengths)))


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


def update_plan_rebuilding(
    fs: fsspec.AbstractFileSystem, root: str, inputs: Callable[[], Iterable[tuple[str, str]]], images_per_shard: int,
    markers: dict[int, dict], part: Part = Part.whole(),
) -> tuple[PlanSummary, list[int]]:
    """update_plan, but a damaged plan is rebuilt from the listing (``inputs()`` gives it afresh).

    Returns (plan, ids of committed shards that no longer match it). A committed shard is kept
    only when the ``source`` of its rows is exactly the paths of the rebuilt shard with its id
    (read from its files: only on this rare path), so no image is ever labelled twice.
    """
    try:
        return update_plan(fs, root, inputs(), images_per_shard, part), []
    except DamagedPlanError as exc:
        logger.warning("%s; rebuilding it from the input listing", str(exc).split(";")[0])
    fs.rm_file(f"{root}/{part.plan_name}")
    plan = update_plan(fs, root, inputs(), images_per_shard, part)
    kept: set[int] = set()
    for shard in iter_plan(fs, root, part.plan_name):
        marker = markers.get(shard.shard_id)
        if marker is not None and marker.get("files") and _sources(fs, root, marker) == set(shard.paths):
            kept.add(shard.shard_id)
    return plan, sorted(set(markers) - kept)


def _sources(fs: fsspec.AbstractFileSystem, root: str, marker: dict) -> set[str]:
    import pyarrow.parquet as pq

    found: set[str] = set()
    for name in marker["files"]:
        with fs.open(committed_path(fs, root, int(marker["shard_id"]), name), "rb") as f:
            found.update(pq.read_table(f, columns=["source"]).column(0).to_pylist())
    return found


def read_markers(
    fs: fsspec.AbstractFileSystem, root: str, policy: RetryPolicy | None = None
) -> tuple[dict[int, dict], list[str]]:
    """Every committed shard's marker (one batched read): ({shard_id: marker}, paths of torn markers)."""
    done_dir = f"{root}/{DONE_DIR}"
    policy = policy or RetryPolicy()
    if not call_with_retries(fs.exists, done_dir, policy=policy):
        return {}, []
    paths = sorted(p for p in call_with_retries(fs.ls, done_dir, detail=False, policy=policy) if _is_marker(p))
    if not paths:
        return {}, []

    def read_all() -> list[bytes]:
        contents = read_literal(fs, paths)  # never fs.cat: it reads "out[2]/..." as a glob
        for data in contents:
            if isinstance(data, BaseException):
                raise data
        return contents

    markers: dict[int, dict] = {}
    torn: list[str] = []
    for p, data in zip(paths, call_with_retries(read_all, policy=policy)):
        try:
            marker = json.loads(data)
            markers[int(marker["shard_id"])] = marker
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            torn.append(p)
    return markers, torn


def _is_marker(path: str) -> bool:
    base = posixpath.basename(path)
    return base.endswith(".json") and base.split(".")[0].isdigit()


def committed_path(fs: fsspec.AbstractFileSystem, root: str, shard_id: int, name: str) -> str:
    """Where a committed file of shard ``shard_id`` is now: the root, or still staged (a move not yet done)."""
    at_root = f"{root}/{name}"
    staged = f"{root}/{staged_path(shard_id, name)}"
    return staged if not fs.exists(at_root) and fs.exists(staged) else at_root


def publish(
    fs: fsspec.AbstractFileSystem, root: str, shard_id: int, names: Iterable[str], policy: RetryPolicy | None = None
) -> None:
    """Move a committed shard's staged files to the output root (after its marker: the commit).

    On an object store a move is a copy then a delete; a reader of the root meanwhile sees some
    of the shard's files, never an uncommitted one. A file that is not staged is skipped.
    """
    policy = policy or RetryPolicy()
    for name in names:
        src = f"{root}/{staged_path(shard_id, name)}"
        if call_with_retries(fs.exists, src, policy=policy):
            call_with_retries(fs.mv, src, f"{root}/{name}", policy=policy)
    try:
        fs.rmdir(f"{root}/{STAGED_DIR}/{shard_id:06d}")  # only when empty; object stores have no folders
    except (OSError, NotImplementedError):
        pass


def _is_temp(base: str) -> bool:
    """A temp file our atomic writes make (``.<name>.<x>.tmp``, pipeline/data/storage.py) and a kill left."""
    return base.startswith(".") and base.endswith(".tmp")


def clean_uncommitted(
    fs: fsspec.AbstractFileSystem, root: str, markers: dict[int, dict], torn: list[str] = (),
    policy: RetryPolicy | None = None, part: Part = Part.whole(),
) -> list[str]:
    """Make the output hold exactly its committed shards, at the root; returns what was deleted.

    In this order, so that no reader ever sees two generations of a shard: delete torn markers
    and their temp files, spill parts, and root files of shards without a marker or not listed
    in their marker (an older generation); then move committed shards' staged files in (a move
    a kill cut short); then delete the staged files no marker lists (uncommitted).

    Only ``part``'s shards are touched: another part may be writing its own at this moment.
    """
    owns = part.owns_shard
    torn = [p for p in torn if _owned(posixpath.basename(p), owns)]
    removed = list(torn)
    remove(fs, list(torn))
    done = f"{root}/{DONE_DIR}"
    if fs.exists(done):
        temps = [p for p in fs.ls(done, detail=False)
                 if _is_temp(posixpath.basename(p)) and _owned(posixpath.basename(p)[1:], owns)]
        remove(fs, temps)
        removed.extend(temps)
    tmp = f"{root}/{TMP_DIR}"
    if fs.exists(tmp):
        if not part.partitioned:
            removed.extend(fs.find(tmp))
            fs.rm(tmp, recursive=True)
        else:
            for folder in fs.ls(tmp, detail=False):
                if _owned(posixpath.basename(folder), owns):
                    removed.extend(fs.find(folder))
                    fs.rm(folder, recursive=True)
    if fs.exists(root):
        stale = []
        for p in fs.ls(root, detail=False):
            shard_id = shard_of_part(p)
            if shard_id is None or not owns(shard_id):
                continue
            marker = markers.get(shard_id)
            if marker is None or ("files" in marker and posixpath.basename(p) not in marker["files"]):
                stale.append(p)
        remove(fs, stale)
        removed.extend(stale)
    staged = f"{root}/{STAGED_DIR}"
    if fs.exists(staged):
        roll: dict[int, list[str]] = {}
        for p in fs.find(staged):
            parts = p[len(staged):].strip("/").split("/")
            shard_id = int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else None
            if shard_id is not None and not owns(shard_id):
                continue
            if shard_id is None and part.partitioned:
                continue  # not a shard's file: whose it is cannot be told, so it is left alone
            marker = markers.get(shard_id) if shard_id is not None else None
            if marker is not None and parts[1] in marker.get("files", []):
                roll.setdefault(shard_id, []).append(parts[1])
            else:
                remove(fs, [p])
                removed.append(p)
        for shard_id, names in sorted(roll.items()):
            logger.info("moving committed shard %d's staged files in (a move an earlier run did not finish)",
                        shard_id)
            publish(fs, root, shard_id, names, policy)
        if not part.partitioned:
            try:
                fs.rm(staged, recursive=True)  # empty folders only by now
            except (OSError, FileNotFoundError, NotImplementedError):
                pass
        else:  # this part's empty folders; another part's (and the parent) may be in use
            for folder in fs.ls(staged, detail=False):
                if _owned(posixpath.basename(folder), owns):
                    try:
                        fs.rmdir(folder)
                    except (OSError, NotImplementedError):
                        pass
    return removed


def _owned(name: str, owns: Callable[[int], bool]) -> bool:
    """Whether a marker, temp marker or shard folder name (``000012.json``, ``000012``, ...)
    belongs to a shard ``owns`` says yes to; a name that holds no shard id never does."""
    head = name.split(".")[0]
    return head.isdigit() and owns(int(head))


def drop_markers(fs: fsspec.AbstractFileSystem, root: str, markers: dict[int, dict], shard_ids: list[int]) -> None:
    """Un-commit shards: delete their markers (first) and their files."""
    remove(fs, [f"{root}/{DONE_DIR}/{marker_name(sid)}" for sid in shard_ids])
    remove(fs, [p for sid in shard_ids for name in markers[sid].get("files", [])
                for p in (f"{root}/{name}", f"{root}/{staged_path(sid, name)}")])
    for sid in shard_ids:
        del markers[sid]


def shards_by_id(fs: fsspec.AbstractFileSystem, root: str, shard_ids: Iterable[int],
                 plan_name: str = PLAN) -> dict[int, Shard]:
    """These shards of the saved plan (streamed: only they are kept)."""
    wanted = set(shard_ids)
    return {s.shard_id: s for s in iter_plan(fs, root, plan_name) if s.shard_id in wanted} if wanted else {}
