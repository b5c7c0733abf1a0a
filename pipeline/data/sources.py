"""Inputs: list what is under an fsspec URL and read image bytes out of it.

Three kinds of input, mixed freely under one root:
  * image files (one row per file; image_id = path relative to the root),
  * Parquet files with an image-bytes column (image_id = ``<file>/<key or row>``),
  * WebDataset-style tar shards (image_id = ``<tar>/<key>``).

Every input object gets exactly one row and ids are unique within a shard: a
repeated tar member or Parquet key becomes ``key#2``, ``key#3``, ... (stable: the
order of the file decides). Listed files are read by their literal path, never
through fsspec's glob expansion (``bracket[1].png`` is a name, not a pattern).

Listing uses one ``find``/``glob`` call, never a per-file ``info``: on a bucket
of millions of objects that is the difference between seconds and hours.
Reading happens inside Ray tasks (``read_shard``), one work shard at a time; a tar or
Parquet file larger than a shard is read as ranges of its rows (kind ``"tar[0:1000]"``,
see pipeline/data/containers.py).

Only regular files are inputs: a FIFO, socket or device named like one is left out of
the listing (``SkippedInputs``, said in the run's summary), a local open never blocks on
one, and a local read that hangs longer than READ_BLOCK_BOUND_S fails as a transient
fault (retried, then ``storage unavailable``: the shard is redone by the next run).
"""
from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
PARQUET_EXTENSIONS = frozenset({".parquet", ".pq"})
TAR_EXTENSIONS = frozenset({".tar"})
_GLOB_CHARS = "*?["
# Column names tried, in order, when a Parquet file's image column is not named.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "bytes", "image_bytes", "content")
KEY_COLUMN_CANDIDATES = ("key", "image_id", "id", "__key__")
# A local read (an NFS or FUSE mount that hangs) that takes longer than this fails like an
# unreachable storage: retried until the storage deadline, then a "storage unavailable" row.
READ_BLOCK_BOUND_S = 60.0
T = TypeVar("T")


class NoInputError(RuntimeError):
    """Nothing under the input URL looks like an image, a Parquet file or a tar shard."""


@dataclass(frozen=True)
class Listing:
    """The sorted input files under one root, split by kind (paths carry their protocol)."""

    root: str  # URI of the input root (image_id = path relative to it)
    images: list[str]
    parquets: list[str]
    tars: list[str]

    @property
    def count(self) -> int:
        return len(self.images) + len(self.parquets) + len(self.tars)


def extension(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def input_kind(path: str) -> str | None:
    ext = extension(path)
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in PARQUET_EXTENSIONS:
        return "parquet"
    if ext in TAR_EXTENSIONS:
        return "tar"
    return None


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, protocol-less path) for a URL or a local path."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def input_root(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """URI of the input root (image ids are paths relative to it): the folder, a file's folder, a glob's fixed part."""
    return _input_spec(url, storage_options)[2]


def iter_inputs(
    url: str, storage_options: dict[str, Any] | None = None, skipped: "SkippedInputs | None" = None
) -> Iterator[tuple[str, str]]:
    """Every input file under ``url`` as ``(kind, uri)``, streamed, in a deterministic order.

    A folder is walked directory by directory (entries sorted, hidden ones pruned), an S3
    prefix is listed page by page in key order: nothing per file is kept, so a listing of
    millions of files costs no more memory than one directory (or one page) of it.
    Only regular files are inputs: a FIFO, socket or device with an input's name (opening
    a FIFO blocks until someone writes to it) is left out and counted in ``skipped``.
    """
    fs, path, root, pattern, depth = _input_spec(url, storage_options)
    if pattern is None:
        if input_kind(path) is not None and fs.isfile(path):
            what = _not_regular(fs, path)
            if what is None:
                yield input_kind(path), fs.unstrip_protocol(path)
            elif skipped is not None:
                skipped.add(posixpath.basename(path), what)
            return
        stripped_root = path
    else:
        stripped_root = fs._strip_protocol(root)
    for p, what in _walk_files(fs, stripped_root, depth):
        if pattern is not None and not pattern.match(p):
            continue
        kind = input_kind(p)
        if kind is not None and not _is_hidden(p, stripped_root):
            if what is None:
                yield kind, fs.unstrip_protocol(p)
            elif skipped is not None:
                skipped.add(relative_id(p, stripped_root), what)


@dataclass
class SkippedInputs:
    """Files with an input's name that are not regular files (FIFO, socket, device): never read."""

    count: int = 0
    kinds: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    keep: int = 5

    def add(self, name: str, what: str) -> None:
        self.count += 1
        self.kinds[what] += 1
        if len(self.examples) < self.keep:
            self.examples.append(name)

    def reset(self) -> None:
        self.count, self.kinds, self.examples = 0, Counter(), []

    def sentence(self) -> str | None:
        """``skipped 1 non-regular file (FIFO): a/b.png``, or None when nothing was skipped."""
        if not self.count:
            return None
        what = ", ".join(f"{n} {k}" if len(self.kinds) > 1 else k for k, n in sorted(self.kinds.items()))
        names = ", ".join(self.examples) + (", ..." if self.count > len(self.examples) else "")
        plural = "file" if self.count == 1 else "files"
        return f"skipped {self.count} non-regular {plural} ({what}): {names}"

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "kinds": dict(sorted(self.kinds.items())), "examples": list(self.examples),
                "summary": self.sentence()}


def _file_type(mode: int) -> str | None:
    """What a stat mode is when it is not a regular file ("FIFO", "socket", "device"), else None."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs) or "local" in _protocols(fs)


def _not_regular(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """For a local path, what it is when it is not a regular file; None otherwise (object stores hold files)."""
    if not _is_local(fs):
        return None
    try:
        return _file_type(os.stat(path).st_mode)
    except OSError:
        return None  # gone or unreadable: the read says so in its row


def list_inputs(url: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """List every input file under ``url`` (a folder, a single file, or a glob; recursive), sorted.

    Raises NoInputError when nothing matches. Holds the whole listing: for tools that
    read a few thousand files; the labeling job streams `iter_inputs` instead.
    """
    by_kind: dict[str, list[str]] = {"image": [], "parquet": [], "tar": []}
    for kind, uri in iter_inputs(url, storage_options):
        by_kind[kind].append(uri)
    listing = Listing(input_root(url, storage_options), *(sorted(by_kind[k]) for k in ("image", "parquet", "tar")))
    if listing.count == 0:
        raise no_input_error(url)
    return listing


def first_input(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """The first input file under ``url``, found without listing the rest; NoInputError if none."""
    for item in iter_inputs(url, storage_options):
        return item
    raise no_input_error(url)


def output_in_input(input: str, output: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """One sentence when the output folder lies where the input listing would read it (equal to
    the input folder or inside it, not under a ``.``/``_`` folder the listing skips), else None.

    Its committed Parquet files would be labelled as inputs by the next run. A single input
    file is never a problem (only it is read); nor is an input that cannot be opened (the
    checks that follow say so).
    """
    try:
        fs, path, root, pattern, _ = _input_spec(input, storage_options)
        out_fs, out_path = fsspec.core.url_to_fs(output, **(storage_options or {}))
    except Exception:  # noqa: BLE001 - preflight reports an unusable URL
        return None
    if pattern is None and input_kind(path) is not None and fs.isfile(path):
        return None
    if set(_protocols(fs)) != set(_protocols(out_fs)):
        return None
    base = fs._strip_protocol(root).rstrip("/") or "/"
    out = listed = out_path.rstrip("/") or "/"
    if _is_local(fs):
        base, out = os.path.realpath(base), os.path.realpath(out)
    if out != base and not out.startswith(base.rstrip("/") + "/"):
        return None
    inside = out[len(base):].strip("/")
    if any(part.startswith((".", "_")) for part in inside.split("/") if part):
        return None  # the listing prunes such folders
    if pattern is not None and not pattern.match(f"{listed}/labels-000000-000.parquet"):
        return None
    where = "is the input folder" if not inside else f"is inside the input {input!r}"
    return (f"The output {output!r} {where}: the next run would read its Parquet files as input images; "
            "choose an output outside the input (or a folder whose name starts with '_' or '.', which "
            "the input listing skips).")


def no_input_error(url: str) -> NoInputError:
    return NoInputError(
        f"No input matched {url!r}: expected image files ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
        "Parquet files or .tar shards."
    )


def _input_spec(url: str, storage_options: dict[str, Any] | None):
    """(fs, path, root URI, compiled glob or None, walk depth or None) for an input URL."""
    import re

    from fsspec.utils import glob_translate

    # A private filesystem instance without a listings cache: s3fs and gcsfs would
    # otherwise keep every listed entry in memory for the rest of the run.
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}), use_listings_cache=False,
                                     skip_instance_cache=True)
    path = path.rstrip("/") or path
    # A name that exists as written is taken literally (a folder "shots[1]"), never as a pattern.
    if not any(c in path for c in _GLOB_CHARS) or fs.exists(path):
        if input_kind(path) is not None and fs.isfile(path):
            return fs, path, fs.unstrip_protocol(posixpath.dirname(path)), None, None
        return fs, path, fs.unstrip_protocol(path), None, None
    root = _glob_root(path)
    depth = None if "**" in path else path[len(root):].strip("/").count("/") + 1
    return fs, path, fs.unstrip_protocol(root), re.compile(glob_translate(path)), depth


def _walk_files(fs: fsspec.AbstractFileSystem, root: str, maxdepth: int | None) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each file under root, (path, "FIFO"/"socket"/"device") for what is not a
    regular file; streamed: S3 page by page in key order, elsewhere a sorted walk."""
    if maxdepth is None and "s3" in _protocols(fs) and hasattr(fs, "_iterdir"):
        for key in _s3_keys(fs, root):
            yield key, None
        return
    if not fs.isdir(root):
        return
    local = _is_local(fs)
    for dirpath, dirs, files in fs.walk(root, maxdepth=maxdepth, topdown=True, detail=local):
        _prune(dirs, sorted(d for d in dirs if not d.startswith((".", "_"))))  # local: dicts of info
        for name in sorted(files):
            path = f"{dirpath.rstrip('/')}/{name}" if name else dirpath
            what = None
            if local and files[name].get("type") != "file":
                what = _file_type(files[name].get("mode", 0)) or "special file"
            yield path, what


def _prune(dirs: list[str] | dict[str, Any], keep: list[str]) -> None:
    """Walk only ``keep``, in this order (in place: fsspec's walk reads the same list or dict)."""
    if isinstance(dirs, dict):
        kept = {d: dirs[d] for d in keep}
        dirs.clear()
        dirs.update(kept)
    else:
        dirs[:] = keep


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _s3_keys(fs: Any, root: str, page: int = 1000) -> Iterator[str]:
    """Object keys under an S3 prefix, one ListObjectsV2 page at a time (no delimiter: recursive)."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(root)
    listing = fs._iterdir(bucket, delimiter="", prefix=f"{key.rstrip('/')}/" if key else "")

    async def next_page() -> list[str]:
        names = []
        async for info in listing:
            if info.get("type") != "directory" and not info["name"].endswith("/"):
                names.append(info["name"])
            if len(names) >= page:
                break
        return names

    while True:
        names = sync(fs.loop, next_page)
        if not names:
            return
        yield from names


def relative_id(uri: str, root: str) -> str:
    """Path of ``uri`` relative to ``root`` (both with the same protocol prefix)."""
    root = root.rstrip("/")
    if uri.startswith(root + "/"):
        return uri[len(root) + 1 :]
    return posixpath.basename(uri)


def _glob_root(pattern: str) -> str:
    parts = pattern.split("/")
    fixed = []
    for part in parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    return "/".join(fixed) or "/"


def _is_hidden(path: str, root: str) -> bool:
    """Skip dot-files/dirs and underscore dirs (e.g. ``_SUCCESS``, ``.ipynb_checkpoints``) below root."""
    rel = path[len(root) :].lstrip("/") if path.startswith(root) else posixpath.basename(path)
    return any(part.startswith((".", "_")) for part in rel.split("/"))


# --------------------------------------------------------------------------- reading


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
    local = _is_local(fs)
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
    """Open a local file for reading, refusing what is not a regular file without blocking on it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        what = _file_type(os.fstat(fd).st_mode)
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
    if _is_local(fs):
        return bounded(_read_local, path, what=path)
    return fs.cat_file(path)


def open_input(fs: fsspec.AbstractFileSystem, uri: str) -> IO[bytes]:
    """An input file opened for reading (binary); local files as read_one checks them."""
    if _is_local(fs):
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
