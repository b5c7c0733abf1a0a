"""sha256 of weight files, computed once per file and remembered.

A model's provenance records the sha256 of each local weight file. Reading 4 GB
to hash SD 1.x costs seconds on every run, so hashes are kept in a small JSON
cache keyed by the file's real path, size and modification time
(``$DIFFSEG_CACHE/weight-sha256.json``, default ``~/.cache/diffseg``): a file
that changes gets a new size or mtime and is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

__all__ = ["sha256_files", "sha256_file", "hash_cache_path"]

_BLOCK = 1 << 22


def diffseg_cache_dir() -> Path:
    """Where diffseg keeps what it builds or computes once (``$DIFFSEG_CACHE`` or ``~/.cache/diffseg``)."""
    root = os.environ.get("DIFFSEG_CACHE")
    return Path(root).expanduser() if root else Path("~/.cache/diffseg").expanduser()


def hash_cache_path() -> Path:
    return diffseg_cache_dir() / "weight-sha256.json"


def sha256_files(paths: list[str]) -> dict[str, str]:
    """sha256 of each file, keyed ``<subfolder>/<file>``; provenance of local weights."""
    cache = _read_cache()
    out: dict[str, str] = {}
    changed = False
    for p in paths:
        digest, fresh = _cached_sha256(p, cache)
        changed |= fresh
        out[f"{Path(p).parent.name}/{Path(p).name}"] = digest
    if changed:
        _write_cache(cache)
    return out


def sha256_file(path: str) -> str:
    """sha256 of one file, through the cache."""
    return next(iter(sha256_files([path]).values()))


def _cached_sha256(path: str, cache: dict[str, dict]) -> tuple[str, bool]:
    real = os.path.realpath(path)
    st = os.stat(real)
    entry = cache.get(real)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"], False
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    cache[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    return h.hexdigest(), True


def _read_cache() -> dict[str, dict]:
    try:
        data = json.loads(hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict[str, dict]) -> None:
    """Best effort, atomic (temp name + rename): a cache that cannot be written only costs a re-hash."""
    path = hash_cache_path()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
