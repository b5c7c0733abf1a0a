"""A straight port of the official DiffSeg segmentor's loop structure (google/diffseg,
``diffseg/segmentor.py``, TensorFlow) to PyTorch: the baseline of merge_bench.py,
and an independent second implementation the tests compare against.

Kept deliberately close to the reference: one image at a time, aggregation
with per-resolution float64 accumulation, iteration 0 as chunks of
``anchors x maps x R x R`` KL tensors (16 anchors a chunk), later iterations as
a Python loop over proposals, NMS by bilinear upsampling and argmax.

Two changes: the reference hard-codes R = 64 (the grid's 63, the 64x64
buffers, the x8 upsampling); here R and the output size are parameters. And its
iteration-0 KL is computed in float16; here in float32, because float16
elementwise math on a CPU is emulated and would make the baseline unfairly
slow (and NaN-prone). Not product code.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sampling_grid(num_points: int, R: int = 64) -> np.ndarray:
    segment_len = (R - 1) // (num_points - 1)
    total_len = segment_len * (num_points - 1)
    start_point = (R - 1 - total_len) // 2
    x_new = np.linspace(start_point, total_len + start_point, num_points)
    y_new = np.linspace(start_point, total_len + start_point, num_points)
    x_new, y_new = np.meshgrid(x_new, y_new, indexing="ij")
    return np.concatenate([x_new.reshape(-1, 1), y_new.reshape(-1, 1)], axis=-1).astype(int)


def aggregate_weights(weight_list: list[torch.Tensor], R: int) -> torch.Tensor:
    """weight_list: per resolution (heads, r*r, r*r) -> (R, R, R, R) float64."""
    sizes = np.array([np.sqrt(w.shape[-2]) for w in weight_list])
    weight_ratio = sizes / sizes.sum()
    aggre = torch.zeros((R, R, R, R), dtype=torch.float64)
    for index, weights in enumerate(weight_list):
        size = int(np.sqrt(weights.shape[-1]))
        ratio = R // size
        weights = weights.float().mean(0).reshape(-1, 1, size, size)
        weights = F.interpolate(weights, size=(R, R), mode="bilinear", align_corners=False)
        weights = weights.reshape(size, size, R, R)
        weights = weights / weights.sum((2, 3), keepdim=True)
        weights = weights.repeat_interleave(ratio, dim=0).repeat_interleave(ratio, dim=1)
        aggre += weights.double() * weight_ratio[index]
    return aggre


def kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    quotient = torch.log(x) - torch.log(y)
    kl_1 = (x * quotient).sum((-2, -1)) / 2
    kl_2 = -(y * quotient).sum((-2, -1)) / 2
    return kl_1 + kl_2


def mask_merge(it: int, attns: torch.Tensor, kl_threshold: list[float], grid: np.ndarray | None, R: int) -> torch.Tensor:
    if it == 0:
        anchors = attns[grid[:, 0], grid[:, 1], :, :][:, None]  # A x 1 x R x R
        flat = attns.reshape(1, R * R, R, R)
        split = int(np.sqrt(grid.shape[0]))
        kl_bin = []
        for i in range(split):
            temp = kl(anchors[i * split : (i + 1) * split].float(), flat.float()) < kl_threshold[it]
            kl_bin.append(temp)
        kl_bin = torch.cat(kl_bin, 0).double()  # A x R*R
        new_attns = (kl_bin @ flat.reshape(-1, R * R)) / kl_bin.sum(1, keepdim=True)
        return new_attns.reshape(-1, 1, R, R)
    matched: set[int] = set()
    new_attns = []
    for i, point in enumerate(attns):
        if i in matched:
            continue
        matched.add(i)
        kl_bin = (kl(point, attns) < kl_threshold[it]).reshape(-1)
        if kl_bin.sum() > 0:
            for idx in torch.nonzero(kl_bin).reshape(-1).tolist():
                matched.add(idx)
            new_attns.append(attns[kl_bin].mean(0).reshape(1, R, R))
    return torch.stack(new_attns)


def generate_masks(attns: torch.Tensor, kl_threshold: list[float], grid: np.ndarray, R: int, output_size: tuple[int, int]) -> np.ndarray:
    merged = attns
    for i in range(len(kl_threshold)):
        merged = mask_merge(i, attns if i == 0 else merged, kl_threshold, grid if i == 0 else None, R)
    merged = merged[:, 0]
    upsampled = F.interpolate(merged[None].float(), size=output_size, mode="bilinear", align_corners=False)[0]
    return upsampled.argmax(0).numpy()


def segment(maps: dict[int, torch.Tensor], kl_threshold: float = 1.1, iterations: int = 3, num_points: int = 16,
            output_size: tuple[int, int] | None = None) -> np.ndarray:
    """maps: {r: (B, heads, r*r, r*r)} -> (B, H, W) labels, one image at a time."""
    resolutions = sorted(maps, reverse=True)
    R = resolutions[0]
    size = output_size or (8 * R, 8 * R)
    grid = sampling_grid(num_points, R)
    out = []
    for b in range(next(iter(maps.values())).shape[0]):
        weights = aggregate_weights([maps[r][b] for r in resolutions], R)
        out.append(generate_masks(weights, [kl_threshold] * iterations, grid, R, size))
    return np.stack(out)
