"""Inputs: read image bytes out of the listed files (pipeline/data/sources.py lists them).

Every input object gets exactly one row and ids are unique within a shard: a
repeated tar member or Parquet key becomes ``key#2``, ``key#3``, ... (stable: the
order of the file decides). Listed files are read by their literal path, never
through fsspec's glob expansion (``bracket[1].png`` is a name, not a pattern).

Reading happens inside Ray tasks (``read_shard``), one work shard at a time; a tar or
Parquet file larger than a shard is read as ranges of its rows (kind ``"tar[0:1000]"``,
see pipeline/data/containers.py).

A local open never blocks on a FIFO, socket or device (refused: NotRegularFileError), and
a local read that hangs longer than READ_BLOCK_BOUND_S fails as a transient fault
(retried, then ``storage unavailable``: the shard is redone by the next run).
"""
from __future__ import annotations

import os
import posixpath
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.sources import file_type, input_kind, is_local, open_fs, relative_id

# Column names tried, in order, when a Parquet file's image column is not named.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "bytes", "image_bytes", "content")
KEY_COLUMN_CANDIDATES = ("key", "image_id", "id", "__key__")
# A local read (an NFS or FUSE mount that hangs) that takes longer than this fails like an
# unreachable storage: retried until the storage deadline, then a "storage unavailable" row.
READ_BLOCK_BOUND_S = 60.0
T = TypeVar("T")


@dataclass
class RawImage:
    """One image's bytes (or why it has none) as read from a source."""

    image_id: str
    source: str
    data: bytes | None
    error: str | None = None


def read_image_files(
    paths: list[str], root: str, storage_options: dict[str, Any] | None, chunk: int = 32
) -> Iterator[RawImage]:
    """Read whole files, ``chunk`` at a time (one concurrent batched read per chunk on object stores).

    Paths are read as written (``cat_ranges``): fsspec's ``cat`` would expand a name such
    as ``bracket[1].png`` as a glob. A missing or unreadable file becomes a row with an
    error; the shard goes on.
    """
    if not paths:
        return
    fs, _ = open_fs(paths[0], storage_options)
    local = is_local(fs)
    for start in range(0, len(paths), chunk):
        group = paths[start : start + chunk]
        stripped = [fs._strip_protocol(p) for p in group]
        try:
            # Local files one by one, each open checked (a FIFO is refused, never opened for a
            # blocking read) and each read bounded; object stores in one batched read.
            contents = [_or_error(read_one, fs, p) for p in stripped] if local else read_literal(fs, stripped)
        except Exception as exc:  # noqa: BLE001 - e.g. a backend without batched reads: report per file
            contents = [exc] * len(stripped)
        for uri, data in zip(group, contents):
            image_id = relative_id(uri, root)
            if data is None:
                data = FileNotFoundError(uri)
            if isinstance(data, BaseException):
                yield RawImage(image_id, uri, None, f"read error: {type(data).__name__}: {data}")
            else:
                yield RawImage(image_id, uri, bytes(data))


def read_literal(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes | BaseException]:
    """The whole contents of each (protocol-less) path, in order, an exception in place of a
    file that cannot be read. Never a glob: ``cat_ranges`` reads each path as written
    (concurrently on object stores), where ``cat``/``rm``/``copy`` on a list expand ``[*?``."""
    return fs.cat_ranges(list(paths), None, None, on_error="return")


class NotRegularFileError(OSError):
    """An input path that is a FIFO, socket or device: refused before any read (a FIFO's blocks)."""


class DanglingLinkError(FileNotFoundError):
    """An input path that is a symbolic link to nothing (an unfinished download, a moved blob)."""


def dangling_link(path: str) -> DanglingLinkError:
    """The error of a link whose target is missing: what the link says and the missing path (the row's
    id and source name the link itself; the sentence stays short enough for an error row)."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return DanglingLinkError(f"dangling symbolic link -> {target}: {os.path.realpath(path)} does not exist")


def _or_error(fn: Callable[..., T], *args: Any) -> T | BaseException:
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the caller makes it a row
        return exc


def bounded(fn: Callable[..., T], *args: Any, seconds: float | None = None, what: str = "") -> T:
    """``fn(*args)``, but TimeoutError (a transient fault: see pipeline/data/retry.py) when it has not
    returned after ``seconds`` (default READ_BLOCK_BOUND_S): a read that hangs fails like unreachable
    storage instead of holding its task, and every shard queued behind it, forever."""
    seconds = READ_BLOCK_BOUND_S if seconds is None else seconds
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="diffseg-bounded-read", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"reading {what or 'an input'} blocked for more than {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _open_local(path: str) -> IO[bytes]:
    """Open a local file for reading, refusing what is not a regular file without blocking on it.
    A link is opened as what it points to; a dangling one is a DanglingLinkError naming its target."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise dangling_link(path) from None
        raise
    try:
        what = file_type(os.fstat(fd).st_mode)
        if what is not None:
            raise NotRegularFileError(f"not a regular file ({what}): {path}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_local(path: str) -> bytes:
    with _open_local(path) as f:
        return f.read()


def read_one(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole contents of one (protocol-less) input path, read as written (never a glob). Local
    files: a FIFO, socket or device is refused (NotRegularFileError) and the read is bounded."""
    if is_local(fs):
        return bounded(_read_local, path, what=path)
    return fs.cat_file(path)


def open_input(fs: fsspec.AbstractFileSystem, uri: str) -> IO[bytes]:
    """An input file opened for reading (binary); local files as read_one checks them."""
    if is_local(fs):
        path = fs._strip_protocol(uri)
        return bounded(_open_local, path, what=path)
    return fs.open(uri, "rb")


@dataclass
class UniqueKeys:
    """Distinct keys for the rows of one shard, the same on every read of the same file.

    The first ``k`` stays ``k``; a repeat becomes ``k#2``, then ``k#3``, ... (skipping any
    that is already a key of its own), so that every row of a tar with repeated member
    names or a Parquet file with repeated keys gets its own id and its shard can commit.
    """

    taken: set[str] = field(default_factory=set)
    repeats: Counter = field(default_factory=Counter)

    def __contains__(self, key: str) -> bool:
        return key in self.taken

    def claim(self, key: str) -> str:
        unique = key
        while unique in self.taken:
            self.repeats[key] += 1
            unique = f"{key}#{self.repeats[key] + 1}"
        self.taken.add(unique)
        return unique


def read_tar(
    uri: str, root: str, storage_options: dict[str, Any] | None, rows: tuple[int, int] | None = None
) -> Iterator[RawImage]:
    """Stream a WebDataset-style tar: one row per image member, key = member name minus extension.

    The same key with two image extensions (``a.jpg``, ``a.png``) keeps both: the second
    is keyed by its full name. A member name that repeats (appended or concatenated
    shards) gets ``key#2``, ``key#3``, ... in the order of the tar (see UniqueKeys).
    ``rows``: only the image members ``[start, stop)`` (a shard of a large tar, see
    pipeline/data/containers.py); the tar is then read seekably, skipping the other members'
    bytes, and the keys are the ones a whole read gives them.
    """
    shard = relative_id(uri, root)
    fs, _ = open_fs(uri, storage_options)
    with open_input(fs, uri) as f, tarfile.open(fileobj=f, mode="r|*" if rows is None else "r:") as tar:
        for index, (member, key) in enumerate(tar_image_members(tar)):
            if rows is not None and index < rows[0]:
                continue
            if rows is not None and index >= rows[1]:
                return
            image_id = f"{shard}/{key}"
            try:
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
            except Exception as exc:  # noqa: BLE001
                yield RawImage(image_id, uri, None, f"read error: {type(exc).__name__}: {exc}")
                continue
            yield RawImage(image_id, uri, data)


def tar_image_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """(member, unique key) of each image member of a tar, in order: the rows of read_tar."""
    keys = UniqueKeys()
    names: set[str] = set()
    for member in tar:
        if not member.isfile() or input_kind(member.name) != "image":
            continue
        base = posixpath.basename(member.name)
        if base.startswith((".", "_")):
            continue
        key = posixpath.splitext(member.name)[0]
        if key in keys and member.name not in names:  # another image extension of one key
            key = member.name
        names.add(member.name)
        yield member, keys.claim(key)


def read_parquet(
    uri: str, root: str, storage_options: dict[str, Any] | None, image_column: str | None = None,
    rows: tuple[int, int] | None = None,
) -> Iterator[RawImage]:
    """One row per Parquet row; reads row group by row group, only the image (and key) columns.

    Key: the key column's value (the row number where it is null, or without a key
    column); a key that repeats gets ``key#2``, ``key#3``, ... in row order (UniqueKeys).
    ``rows``: only rows ``[start, stop)`` (a shard of a large file, see pipeline/data/containers.py):
    only the row groups that hold them are read, and the key column of those before (so that
    repeated keys are numbered as a whole read numbers them).
    """
    shard = relative_id(uri, root)
    fs, _ = open_fs(uri, storage_options)
    start, stop = rows if rows is not None else (0, None)
    with open_input(fs, uri) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        column = image_column or _guess_image_column(schema)
        if column is None or column not in schema.names:
            raise ValueError(
                f"{uri}: no image-bytes column found (columns: {schema.names}); name one with --image-column"
            )
        key_column = next((c for c in KEY_COLUMN_CANDIDATES if c in schema.names and c != column), None)
        if key_column is not None and not pa.types.is_string(schema.field(key_column).type) and not (
            pa.types.is_integer(schema.field(key_column).type)
        ):
            key_column = None
        columns = [column] + ([key_column] if key_column else [])
        unique = UniqueKeys()
        row = 0
        for rg in range(pf.num_row_groups):
            if stop is not None and row >= stop:
                return
            size = pf.metadata.row_group(rg).num_rows
            if row + size <= start:  # wholly before the range: only its keys count
                if key_column:
                    for key in pf.read_row_group(rg, columns=[key_column]).column(0).to_pylist():
                        unique.claim(str(key) if key is not None else str(row))
                        row += 1
                else:
                    row += size
                continue
            table = pf.read_row_group(rg, columns=columns)
            images = table.column(column).to_pylist()
            keys = table.column(key_column).to_pylist() if key_column else [None] * len(images)
            for value, key in zip(images, keys):
                key = str(key) if key is not None else str(row)
                image_id = f"{shard}/{unique.claim(key)}"
                if row >= start and (stop is None or row < stop):
                    data, error = _image_value(value)
                    yield RawImage(image_id, uri, data, error)
                row += 1


def _guess_image_column(schema: pa.Schema) -> str | None:
    def holds_bytes(t: pa.DataType) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields))

    candidates = [n for n in schema.names if holds_bytes(schema.field(n).type)]
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in candidates:
            return name
    return candidates[0] if candidates else None


def _image_value(value: Any) -> tuple[bytes | None, str | None]:
    """Image bytes out of a binary cell or a ``{bytes, path}`` struct cell (HF datasets' Image feature)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return None, "read error: the image cell is null"
    return bytes(value), None


def read_source(
    kind: str, paths: list[str], root: str, storage_options: dict[str, Any] | None, image_column: str | None = None
) -> Iterator[RawImage]:
    """Dispatch on the work shard's kind ("images", "tar", "parquet", or a range such as "tar[0:1000]")."""
    if kind == "images":
        return read_image_files(paths, root, storage_options)
    base, rows = parse_kind(kind)
    if base == "tar":
        return read_tar(paths[0], root, storage_options, rows)
    if base == "parquet":
        return read_parquet(paths[0], root, storage_options, image_column, rows)
    raise ValueError(f"unknown source kind {kind!r}")


def ranged_kind(kind: str, start: int, stop: int) -> str:
    """The kind of a shard of rows ``[start, stop)`` of one tar or Parquet file: ``"tar[0:1000]"``."""
    return f"{kind}[{start}:{stop}]"


def parse_kind(kind: str) -> tuple[str, tuple[int, int] | None]:
    """``"tar[0:1000]"`` -> ``("tar", (0, 1000))``; ``"tar"`` -> ``("tar", None)`` (the whole file)."""
    if not kind.endswith("]") or "[" not in kind:
        return kind, None
    base, _, span = kind[:-1].partition("[")
    start, _, stop = span.partition(":")
    try:
        return base, (int(start), int(stop))
    except ValueError:
        raise ValueError(f"unknown source kind {kind!r}") from None


def shard_error_id(kind: str, uri: str, root: str) -> str:
    """The id of the one row that says a whole shard could not be read: ``<file>/#shard-error``, and
    ``<file>/[<start>:<stop>]/#shard-error`` for a range of a file (one such row per shard, never twice)."""
    rows = parse_kind(kind)[1] if kind != "images" else None
    span = f"/[{rows[0]}:{rows[1]}]" if rows is not None else ""
    return f"{relative_id(uri, root)}{span}/#shard-error"


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    buf: list[T] = []
    for item in items:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf
