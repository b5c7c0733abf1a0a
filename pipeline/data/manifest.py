"""The run manifest at the output root (``_manifest.json``): what made these labels.

It records the model (id, resolved path, revision or weight hashes), every
parameter that changes a label, the package version, and per-run counts and
times. A rerun into the same folder must match the recorded *identity* (input,
model, label parameters); run options such as actor count or batch size may change.
"""
from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipeline.data.retry import RetryPolicy
from pipeline.data.schema import MANIFEST, METADATA_KEY
from pipeline.data.sources import open_fs
from pipeline.data.storage import TornFileError, read_json, write_json

logger = logging.getLogger(__name__)

# model_info keys that describe where a model ran, not what it computes.
_VOLATILE_MODEL_KEYS = frozenset({"device"})


class IncompatibleOutputError(RuntimeError):
    """The output folder holds labels made with another model, parameters or input."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffseg-labeler")
    except Exception:  # noqa: BLE001 - running from a source tree that is not installed
        return "0+unknown"


def model_identity(model_info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_info.items() if k not in _VOLATILE_MODEL_KEYS}


def identity(input_uri: str, model_info: dict[str, Any] | None, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"input": input_uri, "model": model_identity(model_info) if model_info else None, "parameters": parameters}


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """The manifest, None when there is none; TornFileError when it does not parse."""
    manifest = read_json(fs, f"{root}/{MANIFEST}")
    if manifest is not None and not isinstance(manifest, dict):
        raise TornFileError(f"{root}/{MANIFEST} is torn (not a JSON object)")
    return manifest


def recover_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any] | None:
    """read_manifest, but a torn manifest is rebuilt from a committed file's key-value metadata
    (it holds the model, parameters, version and input: what a rerun is checked against);
    the per-run history is lost. None when there is nothing to rebuild from."""
    try:
        return read_manifest(fs, root)
    except TornFileError as exc:
        logger.warning("%s; rebuilding it from the committed files' metadata", exc)
    from pipeline.data.resume import read_markers

    markers, _ = read_markers(fs, root)
    for marker in markers.values():
        for name in marker.get("files", []):
            try:
                with fs.open(f"{root}/{name}", "rb") as f:
                    meta = json.loads(pq.read_schema(f).metadata[METADATA_KEY])
            except (OSError, KeyError, TypeError, ValueError):
                continue
            return {
                "tool": "diffseg-labeler", "version": meta.get("version"), "input": meta.get("input"),
                "model": meta.get("model"), "parameters": meta.get("parameters", {}), "runs": [], "counts": {},
                "rebuilt_from": name,
            }
    return None


def read_labels_manifest(labels: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest of a labels URI (the output folder, or one .parquet file in it), or
    None when there is none or it cannot be read: for the tools that only look at labels."""
    try:
        fs, root = open_fs(labels, storage_options)
        root = root.rstrip("/") or root
        if root.endswith(".parquet"):
            root = posixpath.dirname(root)
        manifest = read_manifest(fs, root)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(
    fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any], policy: RetryPolicy | None = None,
    name: str = MANIFEST,
) -> None:
    """Atomic (temp name + rename, or one PUT), so a kill or a full disk never leaves half a manifest.
    ``name``: a part's own manifest (pipeline/data/parts.py)."""
    write_json(fs, f"{root}/{name}", manifest, policy=policy, indent=2)


def check_compatible(
    existing: dict[str, Any] | None, input_uri: str, model_info: dict[str, Any] | None, parameters: dict[str, Any],
    output: str,
    unknown: tuple[str, ...] = (),
) -> None:
    """Raise IncompatibleOutputError (one sentence) when ``existing`` was made differently.

    With model_info None only the input and the parameters are compared (the cheap
    check); with it, the model's identity too. Keys in ``unknown`` (e.g. a dtype that
    depends on the cluster, before Ray starts) are left for a later call.
    """
    if existing is None:
        return
    old = identity(existing.get("input"), existing.get("model"), existing.get("parameters", {}))
    new = identity(input_uri, model_info, parameters)
    diffs = []
    if old["input"] != new["input"]:
        diffs.append(f"input {old['input']!r} -> {new['input']!r}")
    for key in sorted((set(old["parameters"]) | set(new["parameters"])) - set(unknown)):
        if old["parameters"].get(key) != new["parameters"].get(key):
            diffs.append(f"{key} {_shown(old['parameters'].get(key), key)} -> {_shown(new['parameters'].get(key), key)}")
    if model_info is not None and old["model"] is not None:
        for key in sorted((set(old["model"]) | set(new["model"])) - set(unknown)):
            if old["model"].get(key) != new["model"].get(key):
                diffs.append(f"model {key} differs")
    if diffs:
        raise IncompatibleOutputError(
            f"{output} holds labels made with different settings ({'; '.join(diffs)}): "
            "rerun with the same settings to resume, or pass --overwrite to start over."
        )


#: what an option left out of the parameters was, where that is not "off"
_LEFT_OUT = {"grouping": "'kl-merge'"}


def _shown(value: Any, key: str = "") -> str:
    """A parameter as a person reads it; an option left out of the parameters was off (or its default)."""
    return _LEFT_OUT.get(key, "off") if value is None else repr(value)


def new_manifest(
    input_uri: str, output: str, model_info: dict[str, Any], parameters: dict[str, Any], previous: dict | None
) -> dict[str, Any]:
    return {
        "tool": "diffseg-labeler",
        "version": package_version(),
        "input": input_uri,
        "output": output,
        "model": model_identity(model_info),
        "parameters": parameters,
        "created_at": (previous or {}).get("created_at", time.time()),
        "status": "running",
        "runs": list((previous or {}).get("runs", [])),
        "counts": (previous or {}).get("counts", {}),
    }


# ------------------------------------------------------------------ --part i/N: one manifest per part


def read_part_manifests(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    """Every part's own manifest at the output root, by its ``i/N``; a torn one is left out (its
    part rewrites it when it next runs)."""
    from pipeline.data.parts import part_of_file

    found: dict[str, dict[str, Any]] = {}
    if not fs.exists(root):
        return found
    for path in fs.ls(root, detail=False):
        name = posixpath.basename(path)
        part = part_of_file(name)
        if part is None or not name.startswith("_manifest."):
            continue
        try:
            manifest = read_json(fs, f"{root}/{name}")
        except TornFileError:
            continue
        if isinstance(manifest, dict):
            found[str(part)] = manifest
    return found


def merge_part_manifests(parts: dict[str, dict[str, Any]], count: int) -> dict[str, Any]:
    """One manifest for an output written by ``count`` parts: their shared identity (input, model,
    parameters), the counts summed, every part's runs, and a status that is "complete" only when
    every part is; ``parts`` says where each part stands."""
    from pipeline.data.parts import Part

    keys = sorted(parts, key=lambda k: Part.parse(k).index)
    ordered = [parts[k] for k in keys]
    merged = {k: v for k, v in ordered[0].items() if k not in ("runs", "counts", "status", "part")}
    merged["parts"] = {"count": count, "status": {k: parts[k].get("status") for k in keys}}
    statuses = [m.get("status") for m in ordered]
    if "running" in statuses:
        status = "running"
    elif len(ordered) == count and all(s == "complete" for s in statuses):
        status = "complete"
    elif "interrupted" in statuses:
        status = "interrupted"
    else:
        status = "incomplete"  # a part not started yet, or one that stopped short
    merged["status"] = status
    merged["counts"] = _summed([m.get("counts") or {} for m in ordered])
    merged["runs"] = sorted((dict(run, part=key) for key, m in parts.items() for run in m.get("runs", [])),
                            key=lambda run: run.get("started_at", 0))
    merged["created_at"] = min(m.get("created_at", time.time()) for m in ordered)
    return merged


def _summed(counts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in counts:
        for key, value in c.items():
            if isinstance(value, dict):
                out[key] = _summed([out.get(key) or {}, value])
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
    return out


def write_merged_manifest(fs: fsspec.AbstractFileSystem, root: str, count: int,
                          policy: RetryPolicy | None = None) -> dict[str, Any] | None:
    """Rewrite ``_manifest.json`` from the part manifests until a read after the write finds
    them unchanged (two parts that finish together each merge again after their own write,
    so the last writer has seen every part's final state)."""
    merged = None
    for _ in range(4):
        parts = read_part_manifests(fs, root)
        if not parts:
            return None
        merged = merge_part_manifests(parts, count)
        write_manifest(fs, root, merged, policy)
        if read_part_manifests(fs, root) == parts:
            break
    return merged
