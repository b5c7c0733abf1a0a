"""PAMR (diffseg_core.boundaries) against a straightforward per-pixel loop, and DiffSeg's boundaries option."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffseg_core.boundaries import pamr, pamr_affinity, proposal_distribution
from diffseg_core.merge import compact_labels, labels_from_proposals
from diffseg_core.segmentor import DiffSeg

RING = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def loop_pamr(image: np.ndarray, masks: np.ndarray, iterations: int, dilations: list[int]) -> np.ndarray:
    """The paper's refinement, one pixel and one neighbour at a time (image (C, H, W), masks (K, H, W))."""
    C, H, W = image.shape

    def at(y: int, x: int) -> tuple[int, int]:  # replicate padding
        return min(max(y, 0), H - 1), min(max(x, 0), W - 1)

    neighbours = [(dy * d, dx * d) for d in dilations for dy, dx in RING]
    window = [(0, 0)] * len(dilations) + neighbours
    affinity = np.zeros((len(neighbours), H, W))
    for y in range(H):
        for x in range(W):
            values = np.array([[image[c][at(y + dy, x + dx)] for dy, dx in window] for c in range(C)])
            sigma = values.std(axis=1, ddof=1)
            kernel = []
            for dy, dx in neighbours:
                diffs = [-abs(image[c, y, x] - image[c][at(y + dy, x + dx)]) / (0.1 * sigma[c] + 1e-8) for c in range(C)]
                kernel.append(sum(diffs) / C)
            top = max(kernel)
            e = [math.exp(k - top) for k in kernel]
            affinity[:, y, x] = [v / sum(e) for v in e]
    m = masks.astype(np.float64)
    for _ in range(iterations):
        new = np.zeros_like(m)
        for y in range(H):
            for x in range(W):
                for p, (dy, dx) in enumerate(neighbours):
                    new[:, y, x] += affinity[p, y, x] * m[(slice(None), *at(y + dy, x + dx))]
        m = new
    return m


@pytest.mark.parametrize("dilations", [[1], [1, 2, 4], [1, 3, 12]])  # 12: past the 7 x 9 image's size
def test_pamr_matches_a_loop_reference(dilations):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((2, 3, 7, 9), generator=gen)
    image[1, :, :, :4] += 2.0  # an edge
    masks = torch.rand((2, 3, 7, 9), generator=gen)
    masks /= masks.sum(1, keepdim=True)
    out = pamr(image, masks, iterations=3, dilations=dilations)
    for b in range(2):
        want = loop_pamr(image[b].double().numpy(), masks[b].numpy(), 3, dilations)
        np.testing.assert_allclose(out[b].numpy(), want, rtol=1e-4, atol=1e-6)


def test_affinities_sum_to_one_and_stop_at_edges():
    image = torch.zeros((1, 3, 10, 12))
    image[..., 6:] = 1.0
    image += 0.01 * torch.rand((1, 3, 10, 12), generator=torch.Generator().manual_seed(1))
    a = pamr_affinity(image, [1, 2])
    torch.testing.assert_close(a.sum(1), torch.ones((1, 10, 12)))
    # a pixel next to the edge gives almost nothing to neighbours across it
    assert float(a[0, 4, 5, 5]) < 1e-3  # (0, +1) at dilation 1: across the edge
    masks = torch.zeros((1, 2, 10, 12))
    masks[:, 0, :, :8] = 1.0  # the soft mask's edge is 2 px off the image's
    masks[:, 1] = 1.0 - masks[:, 0]
    refined = pamr(image, masks, iterations=10, dilations=[1, 2])
    assert (refined[0].argmax(0)[:, :6] == 0).all()
    assert (refined[0].argmax(0)[:, 8:] == 1).all()


def test_proposal_distribution_keeps_the_argmax_of_nms():
    proposals = torch.rand((4, 8, 8), generator=torch.Generator().manual_seed(2))
    dist = proposal_distribution(proposals, (40, 30))
    torch.testing.assert_close(dist.sum(1), torch.ones((1, 40, 30)))
    assert torch.equal(dist[0].argmax(0), labels_from_proposals(proposals, (40, 30)))


def _maps(seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {8: torch.softmax(4 * torch.randn((2, 64, 64), generator=gen), -1)}


def test_default_is_the_paper_label_for_label():
    maps = _maps()
    plain, off = DiffSeg(kl_threshold=1.0, num_points=4), DiffSeg(kl_threshold=1.0, num_points=4, boundaries="off")
    proposals = plain.proposals(maps)
    want = [compact_labels(labels_from_proposals(p, (50, 70))) for p in proposals]
    for got in (plain.label_maps(proposals, [(50, 70)] * 2), off.label_maps(proposals, [(50, 70)] * 2)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_pamr_in_diffseg_follows_the_image():
    maps = _maps(3)
    seg = DiffSeg(kl_threshold=1.0, num_points=4, boundaries="pamr", pamr_iterations=5, pamr_dilations=[1, 2, 4])
    proposals = seg.proposals(maps)
    images = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(4)) * 2 - 1
    got = seg.label_maps(proposals, [(64, 64), (48, 80)], images)
    assert [tuple(g.shape) for g in got] == [(64, 64), (48, 80)]
    for g, p in zip(got, proposals):
        assert int(g.min()) == 0 and int(g.max()) == len(torch.unique(g)) - 1 < p.shape[0]
    with pytest.raises(ValueError, match="needs the batch's images"):
        seg.label_maps(proposals, [(64, 64)] * 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"boundaries": "crf"}, "boundaries must be one of off, pamr"),
    ({"boundaries": "pamr", "pamr_iterations": 0}, "pamr_iterations must be"),
    ({"boundaries": "pamr", "pamr_dilations": []}, "pamr_dilations must be"),
    ({"min_region_area": -1}, "min_region_area must be"),
])
def test_bad_values_are_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffSeg(**kwargs)
