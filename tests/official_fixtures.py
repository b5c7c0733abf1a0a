"""Load the official DiffSeg reference cases in tests/fixtures/diffseg-official.

Each case holds synthetic, SD-like attention parameters and the label map the
official TensorFlow implementation produced from them; the fixture README says
how to rebuild the attention, which is what :func:`build_attention` does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "diffseg-official"
CASES = sorted(p.stem for p in FIXTURE_DIR.glob("*.npz"))
SUMMARY = json.loads((FIXTURE_DIR / "official_summary.json").read_text())


def load_case(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURE_DIR / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def build_attention(case: dict[str, np.ndarray], resolution: int) -> torch.Tensor:
    """(heads, R*R, R*R) float32 attention of one resolution, per the fixture README."""
    R = resolution
    features = torch.from_numpy(case[f"r{R}_features"]).float()
    w = torch.from_numpy(case[f"r{R}_w"]).float()
    beta = float(case[f"r{R}_beta"])
    sigma = float(case[f"r{R}_sigma"])
    floor = float(case["floor"])
    rows, cols = torch.meshgrid(torch.arange(R), torch.arange(R), indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], 1).float() / R
    locality = torch.cdist(pos, pos).square() / (2 * sigma**2)
    out = torch.empty(w.shape[0], R * R, R * R)
    for h in range(w.shape[0]):
        logits = beta * (features @ w[h] @ features.T) - locality
        out[h] = (1 - floor) * torch.softmax(logits, -1) + floor / (R * R)
    return out


def build_maps(case: dict[str, np.ndarray]) -> dict[int, torch.Tensor]:
    """The {64, 32, 16, 8} input of DiffSeg.segment, with a batch axis of 1."""
    return {r: build_attention(case, r)[None] for r in (64, 32, 16, 8)}
