"""Label-map clean-up (diffseg_core.regions): small regions absorbed, connected parts split."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from diffseg_core.regions import CONNECTIVITY, absorb_small_regions, clean_label_map, split_connected


def regions_of(labels: np.ndarray) -> list[int]:
    """Area of every 4-connected region of every segment."""
    areas = []
    for v in np.unique(labels):
        parts, n = ndimage.label(labels == v, structure=CONNECTIVITY)
        areas += list(np.bincount(parts.ravel())[1:])
    return areas


def test_an_island_and_a_hole_are_absorbed():
    labels = np.zeros((20, 30), dtype=np.int64)
    labels[:, 15:] = 1
    labels[5:7, 3:5] = 1  # an island of 4 px in segment 0
    labels[10, 20] = 0  # a hole of 1 px in segment 1
    labels[0:10, 0:2] = 2  # a region of 20 px: kept at area 10
    out = clean_label_map(labels, min_region_area=10)
    want = labels.copy()
    want[5:7, 3:5] = 0
    want[10, 20] = 1
    np.testing.assert_array_equal(out, want)


def test_connected_splits_and_numbers_without_gaps():
    labels = np.zeros((6, 8), dtype=np.int64)
    labels[:, 3] = 2  # splits segment 0 into two parts
    labels[0, 7] = 1  # segment 1: one pixel
    out = split_connected(labels)
    assert sorted(np.unique(out)) == [0, 1, 2, 3]
    assert out[0, 0] == 0 and out[0, 5] == 1 and out[0, 7] == 2 and out[0, 3] == 3
    # diagonal neighbours are not one region (4-connectivity)
    diag = np.array([[0, 1], [1, 0]])
    assert len(np.unique(split_connected(diag))) == 4


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("area", [1, 5, 30])
def test_every_segment_is_one_region_of_at_least_the_area(seed, area):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(10, 40, size=2)
    coarse = rng.integers(0, 4, size=(h // 4 + 1, w // 5 + 1))
    labels = np.kron(coarse, np.ones((4, 5), dtype=np.int64))[:h, :w]
    noise = rng.random((h, w)) < 0.1
    labels[noise] = rng.integers(0, 6, size=int(noise.sum()))  # specks
    out = clean_label_map(labels, min_region_area=area, connected=True)
    assert out.shape == labels.shape and out.dtype == np.int64
    assert sorted(np.unique(out)) == list(range(int(out.max()) + 1))
    for v in np.unique(out):
        parts, n = ndimage.label(out == v, structure=CONNECTIVITY)
        assert n == 1
        assert (out == v).sum() >= area
    # without connected, regions of one segment may be apart, but each one is at least the area
    apart = clean_label_map(labels, min_region_area=area)
    assert min(regions_of(apart)) >= area
    assert sorted(np.unique(apart)) == list(range(int(apart.max()) + 1))


def test_off_and_an_image_smaller_than_the_area():
    labels = np.array([[0, 1], [1, 1]])
    np.testing.assert_array_equal(clean_label_map(labels), labels)
    np.testing.assert_array_equal(absorb_small_regions(np.zeros((3, 3), int), 100), np.zeros((3, 3)))
    np.testing.assert_array_equal(clean_label_map(labels, 100), np.zeros((2, 2)))
