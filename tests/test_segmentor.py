"""DiffSeg.segment: the stable API, any resolution set, batching, numerics, bad input."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from benchmarks import reference_port
from diffseg_core import DiffSeg, aggregate_attention
from diffseg_core.aggregate import anchor_grid
from diffseg_core.interpolation import bilinear_matrix, resize_bilinear
from diffseg_core.merge import labels_from_proposals, merge_proposals, symmetric_kl
from tests.synthetic_attention import agreement, planted_maps
from tests.tolerances import assert_same_labels


# --- the stable API -----------------------------------------------------------

def test_segment_returns_int64_labels_of_the_requested_size():
    maps, truth = planted_maps((16, 8), regions=4)
    labels = DiffSeg(num_points=8).segment(maps, output_size=(37, 53))
    assert labels.dtype == torch.int64 and labels.shape == (1, 37, 53)
    values = torch.unique(labels)
    assert torch.equal(values, torch.arange(len(values)))  # 0..K-1, no gaps


def test_default_output_size_is_eight_times_the_attention_resolution():
    maps, _ = planted_maps((16, 8))
    assert DiffSeg(num_points=8).segment(maps).shape == (1, 128, 128)


def test_recovers_planted_regions():
    maps, truth = planted_maps((16, 8), regions=4, seed=3)
    labels = DiffSeg(num_points=8).segment(maps, output_size=(16, 16))
    assert agreement(labels[0], truth[0]) > 0.95


def test_heads_and_head_averaged_maps_give_the_same_labels():
    maps, _ = planted_maps((16, 8), heads=3)
    averaged = {r: m.mean(1) for r, m in maps.items()}
    seg = DiffSeg(num_points=8)
    assert_same_labels(seg.segment(maps), seg.segment(averaged))  # two paths: equal up to float ties


def test_a_batch_equals_its_images_one_at_a_time():
    maps, _ = planted_maps((16, 8), batch=3, seed=1)
    seg = DiffSeg(num_points=8)
    batched = seg.segment(maps, output_size=(32, 32))
    for b in range(3):
        single = seg.segment({r: m[b : b + 1] for r, m in maps.items()}, output_size=(32, 32))
        assert_same_labels(batched[b], single[0])  # other matrix shapes: equal up to float ties


def test_matches_the_straight_port_of_the_reference():
    maps, _ = planted_maps((32, 16, 8), regions=5, seed=7)
    ours = DiffSeg(num_points=8).segment(maps)[0].numpy()
    ref = reference_port.segment(maps, num_points=8)[0]
    assert agreement(ours, ref) > 0.999
    assert ours.max() + 1 == len(np.unique(ref))


@pytest.mark.parametrize(
    "resolutions",
    [(64, 32, 16, 8), (96, 48, 24, 12), (64, 32), (24, 12), (16,)],
    ids=["sd1", "sd2-768", "sdxl", "small", "single"],
)
def test_any_resolution_set_whose_largest_is_divisible_by_the_others(resolutions):
    # 96 -> 96^2 = 9216 rows: build with one head to keep it light.
    maps, truth = planted_maps(resolutions, regions=3, heads=1, seed=2)
    R = max(resolutions)
    labels = DiffSeg(num_points=8).segment(maps, output_size=(R, R))
    assert labels.shape == (1, R, R)
    assert agreement(labels[0], truth[0]) > 0.9


def test_kl_threshold_float_or_one_per_iteration():
    maps, _ = planted_maps((16, 8))
    assert DiffSeg(kl_threshold=1.1).iterations == 3
    assert DiffSeg(kl_threshold=[1.1, 0.9]).iterations == 2
    assert DiffSeg(kl_threshold=0.9, iterations=5).thresholds == [0.9] * 5
    same = DiffSeg(kl_threshold=[1.1] * 3, num_points=8).segment(maps)
    assert torch.equal(same, DiffSeg(kl_threshold=1.1, num_points=8).segment(maps))
    # One iteration (the reference cannot: its reshape assumes more than one).
    assert DiffSeg(kl_threshold=[1.1], num_points=8).segment(maps).shape == (1, 128, 128)


def test_lower_threshold_gives_at_least_as_many_segments():
    maps, _ = planted_maps((16, 8), regions=6, seed=4)
    counts = [int(DiffSeg(kl_threshold=t, num_points=8).segment(maps).max()) + 1 for t in (2.0, 1.1, 0.3)]
    assert counts == sorted(counts)


def test_aggregation_weights_can_be_given():
    maps, _ = planted_maps((16, 8))
    default = aggregate_attention(maps)
    assert torch.allclose(default, aggregate_attention(maps, weights={16: 2, 8: 1}))
    assert torch.allclose(default, aggregate_attention(maps, weights=[2 / 3, 1 / 3]))
    only_fine = aggregate_attention(maps, weights={16: 1.0, 8: 0.0})
    assert torch.allclose(only_fine, maps[16].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="no weight for resolutions"):
        aggregate_attention(maps, weights={16: 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        aggregate_attention(maps, weights=[1.0, -1.0])


def test_segmentor_pickles_for_ray_workers():
    maps, _ = planted_maps((16, 8))
    seg = DiffSeg(num_points=8)
    seg.segment(maps)  # fills the work buffers, which must not travel
    clone = pickle.loads(pickle.dumps(seg))
    assert torch.equal(clone.segment(maps), seg.segment(maps))


def test_proposals_from_a_float16_aggregate_as_the_cpu_merge_workers_get_it():
    maps, _ = planted_maps((16, 8), regions=4, seed=5)
    seg = DiffSeg(num_points=8)
    agg = aggregate_attention(maps)
    direct = [labels_from_proposals(p, (64, 64)) for p in seg.proposals_from_aggregate(agg)]
    shipped = [labels_from_proposals(p, (64, 64)) for p in seg.proposals_from_aggregate(agg.half())]
    assert agreement(direct[0], shipped[0]) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    maps, _ = planted_maps((32, 16, 8), regions=4, batch=2)
    seg = DiffSeg(num_points=8)
    cpu = seg.segment(maps)
    cuda = seg.segment({r: m.cuda() for r, m in maps.items()})
    assert cuda.device.type == "cuda"
    assert agreement(cpu[0], cuda[0].cpu()) > 0.999 and agreement(cpu[1], cuda[1].cpu()) > 0.999


# --- aggregation exactly as DESIGN.md step 4 -----------------------------------

def test_aggregation_follows_the_method_step_by_step():
    maps, _ = planted_maps((16, 8, 4), heads=2, seed=9)
    R = 16
    expected = torch.zeros(R * R, R * R, dtype=torch.float64)
    for r, w in zip((16, 8, 4), (16 / 28, 8 / 28, 4 / 28)):
        a = maps[r][0].mean(0).reshape(r * r, 1, r, r)
        up = torch.nn.functional.interpolate(a, size=(R, R), mode="bilinear", align_corners=False)
        up = up.reshape(r, r, R * R)
        up = up / up.sum(-1, keepdim=True)
        f = R // r
        up = up.repeat_interleave(f, 0).repeat_interleave(f, 1).reshape(R * R, R * R)
        expected += w * up.double()
    got = aggregate_attention(maps)[0]
    assert torch.allclose(got.double(), expected, atol=1e-7)
    assert torch.allclose(got.sum(-1), torch.ones(R * R), atol=1e-5)


def test_anchor_grid_is_the_references():
    grid = anchor_grid(64, 16).reshape(16, 16)
    assert grid[0, 0] == 1 * 64 + 1 and grid[0, 1] == 1 * 64 + 5 and grid[1, 0] == 5 * 64 + 1
    assert grid[-1, -1] == 61 * 64 + 61
    expected = reference_port.sampling_grid(16, 64)
    assert torch.equal(anchor_grid(64, 16), torch.from_numpy(expected[:, 0] * 64 + expected[:, 1]))


@pytest.mark.parametrize("size", [(512, 512), (37, 1000), (1, 1), (3, 700)])
def test_matrix_bilinear_equals_torch_interpolate(size):
    x = torch.rand(3, 64, 48)
    ours = resize_bilinear(x, size)
    theirs = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)  # torch computes its weights in float32
    assert torch.allclose(bilinear_matrix(size[0], 64).sum(1), torch.ones(size[0]))


def test_nms_in_bands_equals_one_pass(monkeypatch):
    proposals = torch.rand(5, 16, 16)
    whole = labels_from_proposals(proposals, (300, 211))
    import diffseg_core.merge as merge

    monkeypatch.setattr(merge, "NMS_BAND_ELEMENTS", 5 * 211 * 7)  # bands of 7 rows
    banded = merge.labels_from_proposals(proposals, (300, 211))
    expected = torch.nn.functional.interpolate(proposals[None], size=(300, 211), mode="bilinear", align_corners=False)
    # other matrix shapes may round differently: a pixel may differ only where its two
    # proposals tie within float32 rounding of the upsampled values
    differ = banded != whole
    up = expected[0]
    gap = (up.gather(0, banded[None]) - up.gather(0, whole[None]))[0].abs()
    assert not differ.any() or float(gap[differ].max()) < 1e-5
    assert float(differ.float().mean()) < 1e-3
    assert agreement(whole, expected[0].argmax(0)) > 0.999


# --- numerics: better than the reference where it is weak ---------------------

def test_symmetric_kl_equals_the_definition():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 64, generator=g), -1)
    q = torch.softmax(torch.randn(7, 64, generator=g), -1)
    pd, qd = p.double()[:, None], q.double()[None]
    expected = 0.5 * (pd * (pd / qd).log()).sum(-1) + 0.5 * (qd * (qd / pd).log()).sum(-1)
    assert torch.allclose(symmetric_kl(p, q).double(), expected, atol=1e-5)


def test_maps_with_zeros_and_tiny_values_give_no_nan():
    # Attention whose small entries underflowed to exactly 0 (as float16
    # attention does) or are denormal-small: the reference's float16 log gives
    # -inf there, and its KL NaN.
    maps, truth = planted_maps((16, 8), regions=4, seed=11)
    for r, m in maps.items():
        m[m < 1e-4] = 0.0
        m[..., 0] += 1e-30  # tiny but non-zero
        maps[r] = m / m.sum(-1, keepdim=True)
    assert (maps[16] == 0).float().mean() > 0.5
    seg = DiffSeg(num_points=8)
    proposals = seg.proposals(maps)
    assert all(bool(torch.isfinite(p).all()) for p in proposals)
    labels = seg.segment(maps, output_size=(16, 16))
    assert agreement(labels[0], truth[0]) > 0.9
    # The distance between disjoint maps is large but finite.
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.5, 0.5]])
    d = symmetric_kl(a, b)
    assert bool(torch.isfinite(d).all()) and float(d) > 10


def test_greedy_merge_uses_all_proposals_within_tau_matched_or_not():
    # Three 1-D "maps": 0 and 1 are close, 1 and 2 are close, 0 and 2 are not.
    # Proposal 0 takes {0, 1}; proposal 2 is not yet matched, so it becomes an
    # anchor and takes {1, 2}: 1 is used twice, as in the reference.
    base = torch.tensor([[0.70, 0.20, 0.10], [0.55, 0.30, 0.15], [0.40, 0.40, 0.20]])
    d = symmetric_kl(base, base)
    tau = float((d[0, 1] + d[0, 2]) / 2)
    assert d[0, 1] < tau and d[1, 2] < tau and d[0, 2] > tau
    merged = merge_proposals(base, tau)
    assert torch.allclose(merged, torch.stack([base[[0, 1]].mean(0), base[[1, 2]].mean(0)]))


# --- bad input ------------------------------------------------------------------

def _valid(r: int = 8, batch: int = 1) -> torch.Tensor:
    return torch.softmax(torch.randn(batch, r * r, r * r), -1)


@pytest.mark.parametrize(
    "maps, message",
    [
        ({}, "non-empty"),
        ([_valid()], "non-empty dict"),
        ({8: torch.rand(1, 64, 64)}, "summing to 1"),
        ({8: _valid() * 2}, "summing to 1"),
        ({8: torch.rand(1, 60, 60)}, "not a square"),
        ({8: torch.rand(1, 64, 65)}, "query and key lengths differ"),
        ({16: _valid(8)}, "key says resolution 16"),
        ({8: _valid(8), 6: _valid(6)}, "do not divide"),
        ({8: _valid(8), 4: _valid(4, batch=2)}, "mismatched batch sizes"),
        ({8: torch.full((1, 64, 64), float("nan"))}, "NaN or inf"),
        ({8: torch.where(torch.eye(64).bool(), float("inf"), 0.0)[None]}, "NaN or inf"),
        ({8: (torch.eye(64) * 2 - torch.roll(torch.eye(64), 1, 1))[None]}, "negative"),
        ({8: torch.ones(1, 64, 64, dtype=torch.long)}, "floating-point"),
        ({8: torch.rand(64, 64)}, "shape"),
        ({8: _valid(8, batch=0)}, "batch size is 0"),
        ({8: "not a tensor"}, "torch.Tensor"),
    ],
    ids=[
        "empty", "not-a-dict", "rows-not-normalised", "rows-sum-2", "non-square", "not-square-matrix",
        "key-mismatch", "not-dividing", "batch-mismatch", "nan", "inf", "negative", "integer", "no-batch-axis",
        "empty-batch", "not-a-tensor",
    ],
)
def test_bad_input_is_a_clear_value_error(maps, message):
    with pytest.raises(ValueError, match=message):
        DiffSeg(num_points=4).segment(maps)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kl_threshold": [1.1, 1.1], "iterations": 3}, "one per iteration"),
        ({"kl_threshold": []}, "empty"),
        ({"kl_threshold": -1.0}, "positive"),
        ({"kl_threshold": float("nan")}, "positive"),
        ({"iterations": 0}, "iterations"),
        ({"num_points": 1}, "num_points"),
    ],
)
def test_bad_parameters_are_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffSeg(**kwargs)


def test_more_anchors_than_attention_cells_is_an_error():
    with pytest.raises(ValueError, match="exceeds the attention resolution"):
        DiffSeg(num_points=16).segment({8: _valid(8)})


@pytest.mark.parametrize("size", [(0, 10), (-1, 5), "big", (1, 2, 3)])
def test_bad_output_size(size):
    with pytest.raises(ValueError, match="output_size"):
        DiffSeg(num_points=4).segment({8: _valid(8)}, output_size=size)


def test_rows_summing_to_one_within_float16_rounding_are_accepted():
    m = _valid(8).half()
    assert DiffSeg(num_points=4).segment({8: m}).shape == (1, 64, 64)
    assert math.isclose(float(aggregate_attention({8: m}).sum(-1).mean()), 1.0, rel_tol=1e-6)


def test_unique_rows_groups_identical_rows_exactly():
    from diffseg_core.merge import unique_rows

    g = torch.Generator().manual_seed(0)
    base = torch.rand(5, 300, generator=g) > 0.5
    picks = torch.tensor([3, 0, 3, 1, 4, 4, 2, 0])
    mask = base[picks]
    distinct, which = unique_rows(mask)
    assert len(distinct) == 5
    assert torch.equal(distinct[which], mask)
    assert which[0] == which[2] and which[4] == which[5] and which[1] == which[7]
    assert len(set(which.tolist())) == 5
