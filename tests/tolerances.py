"""What "the same" means for floats in these tests, on any machine.

Two code paths that compute one float32 quantity (a batch or one image, pickle- or
safetensors-loaded weights, early stop or the whole UNet, chunked or whole, banded or
whole) can round differently: BLAS/oneDNN kernels pick their blocking and the order of
their sums by shape, thread count, CPU features and memory alignment. Seen here: the
pickle- and safetensors-loaded copies of the same weights gave attention maps up to
9e-8 apart. So floats from two paths are compared with a tolerance, and label maps
(argmax and threshold decisions on such floats) may differ only where those floats tie.
"""
from __future__ import annotations

import numpy as np
import torch

# Attention probabilities (rows sum to 1; SD-sized maps hold values ~1e-4..1e-1): 10x the
# largest rounding difference seen (9e-8), and 500x below what a real change does (the
# tiny model's 16 x 16 maps move by 5e-4 between timestep 300 and 900).
ATTENTION = {"atol": 1e-6, "rtol": 1e-5}

# Label maps computed through two paths: at least this fraction of pixels has the same id.
# Float rounding flips only near-ties of the NMS argmax (as in tests/test_agreement.py).
SAME_LABELS = 0.999


def assert_same_attention(a: dict, b: dict) -> None:
    """Two {resolution: maps} dicts hold the same maps up to float32 rounding."""
    assert sorted(a) == sorted(b)
    for r in a:
        torch.testing.assert_close(a[r], b[r], **ATTENTION)


def assert_same_labels(a, b, min_equal: float = SAME_LABELS) -> None:
    """Two label maps of one shape give the same id to at least ``min_equal`` of the pixels."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    equal = float((a == b).mean())
    assert equal >= min_equal, f"only {equal:.5f} of the pixels have the same label"
