"""K-means: DiffSeg's refinement and the paper's K-Means-C / K-Means-S baselines."""
from __future__ import annotations

import pytest
import torch

from diffseg_core import DiffSeg, kmeans_constant, kmeans_per_image
from diffseg_core.kmeans import kmeans_plus_plus, lloyd
from tests.synthetic_attention import agreement, planted_maps


def test_lloyd_finds_separated_clusters_and_drops_empty_ones():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    # Four initial centres, one far from every point: its cluster empties.
    init = torch.tensor([[1.0, 1.0], [9.0, 1.0], [1.0, 9.0], [100.0, 100.0]])
    labels, found, inertia = lloyd(points, init)
    assert found.shape == (3, 2)
    assert torch.allclose(found, centres, atol=0.1)
    assert torch.equal(labels, torch.arange(3).repeat_interleave(50))
    assert inertia == pytest.approx(float(((points - centres[labels]) ** 2).sum()), rel=0.05)


def test_kmeans_plus_plus_picks_distinct_rows_deterministically():
    rows = torch.eye(5)
    a = kmeans_plus_plus(rows, 5, torch.Generator().manual_seed(1))
    b = kmeans_plus_plus(rows, 5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) == 5


def test_refine_keeps_or_reduces_the_segments_and_still_finds_the_regions():
    maps, truth = planted_maps((16, 8), regions=4, seed=3)
    plain = DiffSeg(num_points=8).segment(maps, output_size=(16, 16))
    refined = DiffSeg(num_points=8, refine=True).segment(maps, output_size=(16, 16))
    assert refined.max() <= plain.max()
    assert agreement(refined[0], truth[0]) > 0.95


def test_kmeans_constant_gives_k_segments_and_finds_planted_regions():
    maps, truth = planted_maps((16, 8), regions=6, batch=2, seed=8)
    labels = kmeans_constant(maps, k=6, output_size=(16, 16))
    assert labels.shape == (2, 16, 16) and labels.dtype == torch.int64
    for b in range(2):
        assert int(labels[b].max()) + 1 <= 6
        assert agreement(labels[b], truth[b]) > 0.85


def test_kmeans_per_image_takes_one_k_per_image():
    maps, _ = planted_maps((16, 8), regions=5, batch=2, seed=2)
    labels = kmeans_per_image(maps, [2, 5], output_size=(16, 16))
    assert int(labels[0].max()) + 1 <= 2
    assert int(labels[1].max()) + 1 <= 5
    assert int(labels[1].max()) + 1 >= 3
    same_seed = kmeans_per_image(maps, [2, 5], output_size=(16, 16))
    assert torch.equal(labels, same_seed)


def test_default_output_size_is_eight_times_the_attention_resolution():
    maps, _ = planted_maps((16, 8))
    assert kmeans_constant(maps, k=3).shape == (1, 128, 128)


@pytest.mark.parametrize(
    "k, kwargs, message",
    [([3, 3], {}, "2 values of k for a batch of 1"), (0, {}, "every k"), (10**6, {}, "every k"), (3, {"n_init": 0}, "n_init")],
)
def test_bad_k(k, kwargs, message):
    maps, _ = planted_maps((16, 8))
    with pytest.raises(ValueError, match=message):
        kmeans_per_image(maps, k, **kwargs)


def test_baselines_reject_bad_maps():
    with pytest.raises(ValueError, match="non-empty"):
        kmeans_constant({})
    with pytest.raises(ValueError, match="summing to 1"):
        kmeans_constant({8: torch.rand(1, 64, 64)})
