"""Step 4 of DiffSeg: validate per-resolution self-attention and aggregate it.

Input: ``{r: tensor (B, heads, r*r, r*r) or (B, r*r, r*r)}``, one r x r attention
map per query position, every map summing to 1.
Output: ``(B, R*R, R*R)`` float32 where R is the largest resolution; row ``i`` is
the aggregated attention map of query position ``i`` (row-major on the R x R
grid), itself a distribution.

For each resolution r, every map's two *key* axes are bilinearly upsampled to
R x R (half-pixel centres), renormalised to sum 1, each *query* position is
repeated R/r times along both query axes, and the result is added with weight
w_r (proportional to r by default). This is exactly the reference
implementation's ``aggregate_weights``, but batched and without materialising
the repeated coarse maps: coarse levels are folded into one another on their
own small query grids and broadcast-added into the full-size result once.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from diffseg_core.interpolation import resize_bilinear

#: How far a map's sum may be from 1 before the input is rejected. Loose enough
#: for float16/bfloat16 attention, tight enough to catch logits or unnormalised
#: scores.
ROW_SUM_TOLERANCE = 5e-3

Weights = Mapping[int, float] | Sequence[float] | None


def aggregate_attention(
    maps: Mapping[int, torch.Tensor], weights: Weights = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Aggregate multi-resolution self-attention into one (B, R*R, R*R) tensor.

    Args:
        maps: resolution -> (B, heads, r*r, r*r) or (B, r*r, r*r) attention
            probabilities; any float dtype, any device. Heads are averaged.
        weights: per-resolution weights, either a mapping ``{r: w}`` or a
            sequence in *descending* resolution order. They are normalised to
            sum 1. Default: proportional to r (64:32:16:8 -> 8:4:2:1 / 15).
        out: optional float32 (B, R*R, R*R) tensor to write into (saves
            allocating 64 MB per image at R = 64 on repeated calls).

    Returns:
        float32 tensor (B, R*R, R*R) on the maps' device; every row sums to 1.

    Raises:
        ValueError: empty input, a sequence length that is not a perfect square
            or does not match its key, resolutions that do not divide the
            largest, mismatched batch sizes or devices, NaN/inf, negative
            values, or maps that do not sum to 1.
    """
    batch, device = _check_structure(maps)
    resolutions = sorted(maps, reverse=True)
    R = resolutions[0]
    w = _normalised_weights(resolutions, weights)
    if out is None:
        out = torch.empty((batch, R * R, R * R), dtype=torch.float32, device=device)
    elif out.shape != (batch, R * R, R * R) or out.dtype != torch.float32 or out.device != device:
        raise ValueError(
            f"out: expected float32 {(batch, R * R, R * R)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )

    # Coarse levels, folded from coarsest upwards on their own query grids, so
    # the expensive (B, R*R, R*R) tensor is written by one pass below.
    coarse: torch.Tensor | None = None  # (B, r, r, R*R) on the current grid r
    coarse_r = 0
    for r in sorted(resolutions[1:]):
        level_sum = _head_sum(maps[r])
        _check_values(maps[r], level_sum, r)
        level = _upsample_keys(level_sum, r, R, w[r]).view(-1, r, r, R * R)
        if coarse is not None:
            level += _repeat_queries(coarse, r // coarse_r)
        coarse, coarse_r = level, r

    # Heads are summed straight into ``out``. Dividing each row by its sum
    # (the reference renormalises anyway) also divides by the head count.
    finest = _head_sum(maps[R], out=out)
    scale = (w[R] / _check_values(maps[R], finest, R)).unsqueeze(-1)  # (B, R*R, 1)
    if coarse is None:
        return torch.mul(finest, scale, out=out)
    # out = coarse (repeated over the query grid) + finest * scale, in one pass.
    f = R // coarse_r
    grid = (batch, coarse_r, f, coarse_r, f)
    torch.addcmul(
        coarse.view(batch, coarse_r, 1, coarse_r, 1, R * R).expand(*grid, R * R),
        finest.reshape(*grid, R * R),
        scale.reshape(*grid, 1),
        out=out.view(*grid, R * R),
    )
    return out


def _check_structure(maps: Mapping[int, torch.Tensor]) -> tuple[int, torch.device]:
    """Shapes, keys, batch sizes, devices and dtypes of the input; returns (batch, device)."""
    if not isinstance(maps, Mapping) or len(maps) == 0:
        raise ValueError("attention maps: expected a non-empty dict {resolution: tensor}, got an empty or non-dict input")
    batch: int | None = None
    device: torch.device | None = None
    for key, value in maps.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"attention maps[{key!r}]: expected a torch.Tensor, got {type(value).__name__}")
        if value.ndim not in (3, 4):
            raise ValueError(
                f"attention maps[{key!r}]: expected shape (B, heads, r*r, r*r) or (B, r*r, r*r), "
                f"got {tuple(value.shape)}"
            )
        seq = value.shape[-1]
        if value.shape[-2] != seq:
            raise ValueError(f"attention maps[{key!r}]: query and key lengths differ: {tuple(value.shape)}")
        r = math.isqrt(seq)
        if r * r != seq:
            raise ValueError(f"attention maps[{key!r}]: sequence length {seq} is not a square (r*r) number")
        if not isinstance(key, int) or key != r:
            raise ValueError(
                f"attention maps[{key!r}]: key says resolution {key} but the sequence length {seq} is {r}x{r}"
            )
        if batch is None:
            batch, device = value.shape[0], value.device
        elif value.shape[0] != batch:
            raise ValueError(f"attention maps: mismatched batch sizes ({batch} and {value.shape[0]} at resolution {r})")
        elif value.device != device:
            raise ValueError(f"attention maps: tensors on different devices ({device} and {value.device})")
        if not value.is_floating_point():
            raise ValueError(f"attention maps[{r}]: expected a floating-point tensor, got {value.dtype}")
        if value.ndim == 4 and value.shape[1] == 0:
            raise ValueError(f"attention maps[{r}]: zero heads")
    if batch == 0:
        raise ValueError("attention maps: batch size is 0")
    R = max(maps)
    bad = sorted(r for r in maps if R % r)
    if bad:
        raise ValueError(f"attention maps: resolutions {bad} do not divide the largest resolution {R}")
    return batch, device


def _check_values(value: torch.Tensor, head_sum: torch.Tensor, r: int) -> torch.Tensor:
    """Finite, non-negative maps that sum to 1; returns the (B, r*r) row sums of ``head_sum``.

    Checked on the head sum, which costs no extra pass over the heads: a NaN or
    inf in any head survives the sum, and so does a negative value unless other
    heads outweigh it, which softmax output cannot do.
    """
    heads = value.shape[1] if value.ndim == 4 else 1
    sums = head_sum.sum(-1)
    if not bool(torch.isfinite(sums).all()):
        raise ValueError(f"attention maps[{r}]: contains NaN or inf")
    deviation = (sums - heads).abs()
    if float(deviation.max()) > ROW_SUM_TOLERANCE * heads:
        worst = float(sums.flatten()[deviation.argmax()]) / heads
        raise ValueError(
            f"attention maps[{r}]: every map (row) must be a probability distribution summing to 1, "
            f"but one sums to {worst:.6g}"
        )
    if float(head_sum.amin()) < 0:
        raise ValueError(f"attention maps[{r}]: contains negative values")
    return sums


def aggregate_side(aggregate: torch.Tensor) -> int:
    """R of an aggregate whose rows hold R*R values; ValueError when the length is not a square."""
    R = math.isqrt(aggregate.shape[-1])
    if R * R != aggregate.shape[-1]:
        raise ValueError(f"aggregate: sequence length {aggregate.shape[-1]} is not a square (R*R) number")
    return R


def anchor_grid(R: int, num_points: int) -> torch.Tensor:
    """Row-major query indices of the reference's num_points x num_points anchor grid.

    ``seg = (R-1)//(n-1)``, ``start = ((R-1) - seg*(n-1))//2``; R=64, n=16 gives
    rows/cols 1, 5, ..., 61.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2, got {num_points}")
    if num_points > R:
        raise ValueError(f"num_points={num_points} exceeds the attention resolution {R}")
    seg = (R - 1) // (num_points - 1)
    start = ((R - 1) - seg * (num_points - 1)) // 2
    coords = torch.arange(num_points) * seg + start
    return (coords[:, None] * R + coords[None, :]).reshape(-1)


def _head_sum(value: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over heads in float32; a head-less float32 input is returned as it is."""
    if value.ndim == 3:
        return value if value.dtype == torch.float32 else torch.as_tensor(value, dtype=torch.float32)
    heads = value.shape[1]
    if out is None:
        out = torch.empty(value.shape[:1] + value.shape[2:], dtype=torch.float32, device=value.device)
    if value.dtype == torch.float32 and 1 < heads <= 4:
        # A few passes of adds beat torch's reduction over an outer axis on CPU.
        torch.add(value[:, 0], value[:, 1], out=out)
        for h in range(2, heads):
            out += value[:, h]
        return out
    return torch.sum(value, 1, dtype=torch.float32, out=out)


def _normalised_weights(resolutions: list[int], weights: Weights) -> dict[int, float]:
    if weights is None:
        raw = {r: float(r) for r in resolutions}
    elif isinstance(weights, Mapping):
        missing = sorted(set(resolutions) - set(int(k) for k in weights))
        if missing:
            raise ValueError(f"aggregation weights: no weight for resolutions {missing}")
        raw = {r: float(weights[r]) for r in resolutions}
    else:
        seq = list(weights)
        if len(seq) != len(resolutions):
            raise ValueError(
                f"aggregation weights: got {len(seq)} weights for {len(resolutions)} resolutions {resolutions}"
            )
        raw = dict(zip(resolutions, map(float, seq)))
    if any(not math.isfinite(v) or v < 0 for v in raw.values()) or sum(raw.values()) <= 0:
        raise ValueError(f"aggregation weights must be finite, non-negative and not all zero: {raw}")
    total = sum(raw.values())
    return {r: v / total for r, v in raw.items()}


def _upsample_keys(m: torch.Tensor, r: int, R: int, weight: float) -> torch.Tensor:
    """(B, r*r, r*r) -> (B, r*r, R*R): bilinear on the key axes, renormalised to sum ``weight``."""
    batch = m.shape[0]
    up = resize_bilinear(m.reshape(batch, r * r, r, r), (R, R)).reshape(batch, r * r, R * R)
    return up.mul_(weight / up.sum(-1, keepdim=True))


def _repeat_queries(level: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, r, r, K) -> (B, r*factor, r*factor, K), each query repeated (repeat_interleave)."""
    b, r, _, k = level.shape
    return level[:, :, None, :, None, :].expand(b, r, factor, r, factor, k).reshape(b, r * factor, r * factor, k)
