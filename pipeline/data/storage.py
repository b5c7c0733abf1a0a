"""Files that are whole or absent: every write of the output goes through here.

On a local (POSIX) file system a file is written under a temporary name in the
same folder, flushed, and renamed into place (rename is atomic); on an object
store one PUT of the whole body is already atomic, so it is written directly.
A reader therefore sees the old file, the new file or none, never half of one;
a JSON file that still does not parse (an older version's leftovers, a damaged
disk) is reported as torn, for the caller to rebuild.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec

from pipeline.data.retry import RetryPolicy, call_with_retries


class TornFileError(ValueError):
    """A bookkeeping file exists but does not parse: half-written by an earlier version or damaged."""


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, durable: bool = False) -> None:
    """Put ``data`` at ``path`` atomically (see the module doc). ``durable``: fsync before the rename."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    folder = posixpath.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(
    fs: fsspec.AbstractFileSystem, path: str, obj: Any, *, policy: RetryPolicy | None = None, indent: int | None = None
) -> None:
    """Atomic, durable JSON write, retried on transient faults (bookkeeping: markers, manifest, plan)."""
    data = json.dumps(obj, indent=indent, sort_keys=True, default=str).encode()
    call_with_retries(write_bytes, fs, path, data, durable=True, policy=policy or RetryPolicy())


def read_json(fs: fsspec.AbstractFileSystem, path: str, *, policy: RetryPolicy | None = None) -> Any:
    """The parsed JSON at ``path``, None when absent; TornFileError when it exists but does not parse."""
    try:
        data = call_with_retries(fs.cat_file, path, policy=policy or RetryPolicy())
    except (FileNotFoundError, NotADirectoryError):  # a folder of the path is missing or is a file
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TornFileError(f"{path} is torn ({len(data)} bytes that are not JSON: {exc})") from None


def remove(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Delete files that may or may not exist."""
    for p in paths:
        try:
            fs.rm_file(p)
        except FileNotFoundError:
            pass
