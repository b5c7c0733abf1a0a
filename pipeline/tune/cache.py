"""The attention cache of ``diffseg tune``: per-resolution self-attention, float16, one file per image.

What is kept is the extractor's output (head- and layer-averaged maps, one per
resolution), not one aggregate: the aggregate depends on the aggregation
weights, and every weighting is one pass over these. At SD 1.x 512 px that is
4096^2 + 1024^2 + 256^2 + 64^2 float16 values = 35.8 MB per image (the 64 x 64
level alone is 33.5 MB, so one aggregate would save 6%); 100 images: 3.6 GB
(measured: benchmarks/tune_bench.py, BENCHMARKS.md). Beside them, the model's
input pixels (S x S x 3 uint8, 0.75 MB at 512 px): ``--boundaries pamr`` refines
with them, as the model actor does with the same pixels. And the UNet encoder's
features (its last self-attention block's output, (C, h, w) float16; SD 1.x at
512 px: 1280 x 16 x 16 = 0.66 MB), what ``--grouping ncut --ncut-affinity
features`` cuts, from the same pass. Entries written before the features were
kept (no ``features`` in the header) still load: the features affinity is then
left out of the search, with a note.

A file is named by a hash of everything its values depend on: the model's
identity (hub id + commit, or the local files' names, sizes and mtimes: no
weights are loaded or hashed to compute it), the image's bytes (sha256), the
model input size, the timestep, the dtype, the paper crop and this cache's
format version. A second ``diffseg tune`` over the same images and model reads
them back and never runs the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where maps are written or read: a refusal before that never loads it
    import torch

CACHE_VERSION = 2  # 2: the model's input pixels are stored too (PAMR)
CACHE_DIR = "attention"
PIXELS = "pixels"
FEATURES = "features"


def model_identity(model: str, revision: str | None = None) -> dict[str, Any]:
    """What identifies a model's weights, cheaply (file stats or a hub commit; nothing loaded)."""
    from diffseg_core.model_check import hub_commit
    from diffseg_core.tiny_model import resolve_model

    resolved = resolve_model(str(model))
    path = Path(resolved).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stats = [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns]
                 for p in files]
        return {"model": str(model), "path": str(path.resolve()), "files": stats}
    return {"model": str(model), "revision": hub_commit(str(model), revision) or revision}


def extraction_key(identity: dict[str, Any], image_sha256: str, *, image_size: int | None, timestep: int,
                   dtype: str, paper_preprocess: bool) -> str:
    """The cache key of one image's attention (hex sha256)."""
    body = {
        "version": CACHE_VERSION,
        "model": identity,
        "image_sha256": image_sha256,
        "image_size": image_size if image_size is not None else "native",
        "timestep": int(timestep),
        "dtype": dtype,
        "paper_preprocess": bool(paper_preprocess),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class AttentionCache:
    """Files ``<root>/<key>.safetensors``: tensors ``r<R>`` (R*R, R*R) float16, ``pixels`` (S, S, 3)
    uint8 (the model's input), ``features`` (C, h, w) float16 (the encoder's), and a JSON header.

    The header (``meta``) holds the image's label frame (height, width), its id,
    the resolutions and the model input size, so a run whose images are all
    cached needs neither the model nor the pixels.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def meta(self, key: str) -> dict[str, Any] | None:
        """The header of a cached entry, or None if there is none (or it cannot be read)."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                return json.loads((f.metadata() or {})["diffseg"])
        except Exception:  # noqa: BLE001 - a truncated or foreign file is a miss; it is rewritten
            return None

    def put(self, key: str, maps: dict[int, "torch.Tensor"], meta: dict[str, Any], pixels: Any = None,
            features: "torch.Tensor | None" = None) -> Path:
        """Store one image's maps {r: (r*r, r*r) or (1, r*r, r*r)} as float16, its (S, S, 3) uint8
        model input and its (C, h, w) encoder features as float16; atomic (write, then rename)."""
        import numpy as np
        import torch
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        tensors = {f"r{r}": m.reshape(r * r, r * r).to("cpu", torch.float16).contiguous() for r, m in maps.items()}
        if pixels is not None:
            tensors[PIXELS] = torch.from_numpy(np.array(pixels, dtype=np.uint8))  # a copy: torch wants it writable
        if features is not None:
            tensors[FEATURES] = features.to("cpu", torch.float16).contiguous()
        header = dict(meta, resolutions=sorted(maps, reverse=True), **({FEATURES: True} if features is not None else {}))
        tmp = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        save_file(tensors, str(tmp), metadata={"diffseg": json.dumps(header)})
        os.replace(tmp, self.path(key))
        return self.path(key)


def load_maps(path: str | os.PathLike) -> dict[int, "torch.Tensor"]:
    """{r: (1, r*r, r*r) float16} of one cached image (the input DiffSeg's aggregation takes)."""
    from safetensors.torch import load_file

    return {int(name[1:]): t[None] for name, t in load_file(str(path)).items() if name not in (PIXELS, FEATURES)}


def has_features(meta: dict[str, Any]) -> bool:
    """Whether a cached entry (its header) holds the encoder's features: not those made before they were kept."""
    return bool(meta.get(FEATURES))


def load_features(path: str | os.PathLike) -> "torch.Tensor":
    """(1, C, h, w) float32: the encoder's features of one cached image (``--ncut-affinity features``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if FEATURES not in f.keys():
            raise KeyError(f"{path}: no encoder features in this cache file (made before they were kept)")
        return f.get_tensor(FEATURES)[None].float()


def load_pixels(path: str | os.PathLike) -> "torch.Tensor":
    """(1, 3, S, S) float in [-1, 1]: the model input of one cached image, exactly as the extractor
    makes it from the same uint8 pixels (what ``--boundaries pamr`` refines with)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if PIXELS not in f.keys():
            raise KeyError(f"{path}: no pixels in this cache file")
        pixels = f.get_tensor(PIXELS)
    return pixels.permute(2, 0, 1)[None].float().div_(127.5).sub_(1.0)
