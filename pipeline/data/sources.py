"""Inputs: list what is under an fsspec URL (image files, Parquet files, tar shards).

Three kinds of input, mixed freely under one root:
  * image files (one row per file; image_id = path relative to the root),
  * Parquet files with an image-bytes column (image_id = ``<file>/<key or row>``),
  * WebDataset-style tar shards (image_id = ``<tar>/<key>``).

Listing streams one walk (an S3 prefix page by page), never a per-file ``info``: on a
bucket of millions of objects that is the difference between seconds and hours. Reading
the listed files is pipeline/data/readers.py.

Only regular files are inputs: a FIFO, socket or device named like one is left out of
the listing (``SkippedInputs``, said in the run's summary). Locally a symbolic link is what
it points to, under its own name: the link's name gives the kind and the image id (a Hugging
Face snapshot's ``images/x.png -> ../../../blobs/<sha>`` is ``images/x.png``), a link to a
folder is walked (each real folder once: a loop ends), a link to a FIFO, socket or device is
skipped like one, and a dangling link is listed: its read makes the row that names the
missing target.
"""
from __future__ import annotations

import os
import posixpath
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
from fsspec.asyn import sync
from fsspec.utils import glob_translate

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
PARQUET_EXTENSIONS = frozenset({".parquet", ".pq"})
TAR_EXTENSIONS = frozenset({".tar"})
_GLOB_CHARS = "*?["


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
    a FIFO blocks until someone writes to it) is left out and counted in ``skipped``; so is a
    local link to one. A local link to a file is listed under its own name (see _walk_local).
    """
    fs, path, root, pattern, depth = _input_spec(url, storage_options)
    if pattern is None:
        if _is_file_input(fs, path):
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


def file_type(mode: int) -> str | None:
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


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs) or "local" in _protocols(fs)


def _not_regular(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """For a local path, what it (or the file a link points to) is when it is not a regular file;
    None otherwise (object stores hold files)."""
    if not is_local(fs):
        return None
    return _local_type(path)


def _local_type(path: str) -> str | None:
    """What a local path (a link: its target) is when it is not a regular file or a folder ("FIFO", ...)."""
    try:
        return file_type(os.stat(path).st_mode)
    except OSError:
        return None  # gone, dangling or unreadable: an input all the same, whose read says so in its row


def _is_file_input(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` names one input file rather than a folder to walk. Locally: anything with an
    input's name that is there and is no folder, a link followed (a link to a file, a FIFO, a dangling
    link: the listing and the read say what it is); fsspec's ``isfile`` says False for every link."""
    if input_kind(path) is None:
        return False
    if is_local(fs):
        return os.path.lexists(path) and not os.path.isdir(path)
    return fs.isfile(path)


def list_inputs(url: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """List every input file under ``url`` (a folder, a single file, or a glob; recursive), sorted.

    Raises NoInputError when nothing matches. Holds the whole listing: for tools that
    read a few thousand files; the labeling job streams `iter_inputs` instead.
    """
    by_kind: dict[str, list[str]] = {"image": [], "parquet": [], "tar": []}
    skipped = SkippedInputs()
    for kind, uri in iter_inputs(url, storage_options, skipped):
        by_kind[kind].append(uri)
    listing = Listing(input_root(url, storage_options), *(sorted(by_kind[k]) for k in ("image", "parquet", "tar")))
    if listing.count == 0:
        raise no_input_error(url, skipped)
    return listing


def first_input(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """The first input file under ``url``, found without listing the rest; NoInputError if none."""
    skipped = SkippedInputs()
    for item in iter_inputs(url, storage_options, skipped):
        return item
    raise no_input_error(url, skipped)


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
    if pattern is None and _is_file_input(fs, path):
        return None
    if set(_protocols(fs)) != set(_protocols(out_fs)):
        return None
    base = fs._strip_protocol(root).rstrip("/") or "/"
    out = listed = out_path.rstrip("/") or "/"
    if is_local(fs):
        base, out = os.path.realpath(base), os.path.realpath(out)
    if out != base and not out.startswith(base.rstrip("/") + "/"):
        return None
    inside = out[len(base):].strip("/")
    if any(_hidden_name(part) for part in inside.split("/") if part):
        return None  # the listing prunes such folders
    if pattern is not None and not pattern.match(f"{listed}/labels-000000-000.parquet"):
        return None
    where = "is the input folder" if not inside else f"is inside the input {input!r}"
    return (f"The output {output!r} {where}: the next run would read its Parquet files as input images; "
            "choose an output outside the input (or a folder whose name starts with '_' or '.', which "
            "the input listing skips).")


def no_input_error(url: str, skipped: SkippedInputs | None = None) -> NoInputError:
    """The one sentence for a listing that found no input; it says what was skipped, if anything was."""
    extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
    if skipped is not None and skipped.count:
        return NoInputError(
            f"No input matched {url!r}: {skipped.sentence()}; only regular files (or links to them) are read, "
            f"and none is an image file ({extensions}), a Parquet file or a .tar shard."
        )
    return NoInputError(f"No input matched {url!r}: expected image files ({extensions}), Parquet files or .tar shards.")


def _input_spec(url: str, storage_options: dict[str, Any] | None):
    """(fs, path, root URI, compiled glob or None, walk depth or None) for an input URL."""
    # A private filesystem instance without a listings cache: s3fs and gcsfs would
    # otherwise keep every listed entry in memory for the rest of the run.
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}), use_listings_cache=False,
                                     skip_instance_cache=True)
    path = path.rstrip("/") or path
    # A name that exists as written is taken literally (a folder "shots[1]"), never as a pattern.
    if not any(c in path for c in _GLOB_CHARS) or fs.exists(path):
        if _is_file_input(fs, path):
            return fs, path, fs.unstrip_protocol(posixpath.dirname(path)), None, None
        return fs, path, fs.unstrip_protocol(path), None, None
    root = _glob_root(path)
    depth = None if "**" in path else path[len(root):].strip("/").count("/") + 1
    return fs, path, fs.unstrip_protocol(root), re.compile(glob_translate(path)), depth


def _walk_files(fs: fsspec.AbstractFileSystem, root: str, maxdepth: int | None) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each file under root, (path, "FIFO"/"socket"/"device") for what is not a
    regular file; streamed: S3 page by page in key order, local folders by _walk_local, elsewhere
    fsspec's sorted walk."""
    if maxdepth is None and "s3" in _protocols(fs) and hasattr(fs, "_iterdir"):
        for key in _s3_keys(fs, root):
            yield key, None
        return
    if is_local(fs):
        yield from _walk_local(root, maxdepth)
        return
    if not fs.isdir(root):
        return
    for dirpath, dirs, files in fs.walk(root, maxdepth=maxdepth, topdown=True):
        dirs[:] = sorted(d for d in dirs if not _hidden_name(d))  # in place: the walk goes on with these
        for name in sorted(files):
            yield (f"{dirpath.rstrip('/')}/{name}" if name else dirpath), None


def _walk_local(root: str, maxdepth: int | None) -> Iterator[tuple[str, str | None]]:
    """The walk of a local folder, symbolic links followed, in fsspec's order (each folder's files
    sorted, then its sub-folders, depth first; ``.``/``_`` folders pruned; ``maxdepth`` 1 = the root's
    files only). A link is what it points to, named by itself: a link to a folder is walked, a link to a
    FIFO, socket or device gives its type, and a dangling link (or a loop of links) is a file (its read
    names what is missing). Each real folder (device, inode) is walked once, by the first path that
    reaches it, so a link back up ends; the set of those grows by one per folder, never per file."""
    seen: set[tuple[int, int]] = set()

    def walk(folder: str, depth: int) -> Iterator[tuple[str, str | None]]:
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:  # gone or unreadable: skipped, as fsspec's walk skips it
            return
        folders = []
        for entry in entries:
            path = f"{folder.rstrip('/')}/{entry.name}"
            if _entry_is(entry.is_dir):  # a link followed
                if not _hidden_name(entry.name):
                    folders.append(path)
            elif _entry_is(entry.is_file):  # a regular file, or a link to one
                yield path, None
            else:
                yield path, _local_type(path)
        if maxdepth is None or depth < maxdepth:
            for sub in folders:
                yield from walk(sub, depth + 1)

    yield from walk(root, 1)


def _entry_is(test: Any) -> bool:
    """``DirEntry.is_dir``/``is_file`` (links followed), False where the entry cannot be stat'ed."""
    try:
        return bool(test())
    except OSError:
        return False


def _hidden_name(name: str) -> bool:
    return name.startswith((".", "_"))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _s3_keys(fs: Any, root: str, page: int = 1000) -> Iterator[str]:
    """Object keys under an S3 prefix, one ListObjectsV2 page at a time (no delimiter: recursive)."""
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
    return any(_hidden_name(part) for part in rel.split("/"))
