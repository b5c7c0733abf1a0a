"""The clean-up at its thresholds (issue 34, item 2): --min-region-area N absorbs regions of fewer
than N pixels and keeps N and N + 1; --connected splits by 4-connectivity (edge-sharing), so
regions touching only at a corner stay two; a segment that is all small islands; one region."""
from __future__ import annotations

import numpy as np
import pytest

from diffseg_core.regions import absorb_small_regions, clean_label_map, split_connected

N = 6


def _map_with_island(pixels: int) -> np.ndarray:
    """Label 0 everywhere but a 1-pixel-high bar of ``pixels`` pixels of label 1 (away from the border)."""
    labels = np.zeros((5, 12), dtype=np.int64)
    labels[2, 1:1 + pixels] = 1
    return labels


@pytest.mark.parametrize("pixels, kept", [(N - 1, False), (N, True), (N + 1, True)])
def test_a_region_below_the_area_is_absorbed_and_one_of_the_area_is_kept(pixels, kept):
    labels = _map_with_island(pixels)
    out = clean_label_map(labels, min_region_area=N)
    assert (np.array_equal(out, labels)) is kept, out
    if not kept:
        assert not out.any()  # joined the label around it
    assert np.array_equal(absorb_small_regions(labels, N), labels) is kept


def test_corner_touching_regions_are_two_under_4_connectivity():
    labels = np.zeros((6, 6), dtype=np.int64)
    labels[1:3, 1:3] = 1
    labels[3:5, 3:5] = 1  # touches the first block only at a corner; label 0 around both is one region
    split = split_connected(labels)
    assert len(np.unique(split[labels == 1])) == 2, split
    # each block is 4 pixels: an area of 5 absorbs both (they are not one 8-pixel region), 4 keeps them
    assert not absorb_small_regions(labels, 5).any()
    assert np.array_equal(absorb_small_regions(labels, 4), labels)


def test_a_segment_that_is_all_small_islands_vanishes():
    labels = np.zeros((9, 9), dtype=np.int64)
    labels[1::3, 1::3] = 1  # nine 1-pixel islands, corner-free
    labels[4, 4] = 2  # another label's island among them
    out = clean_label_map(labels, min_region_area=2)
    assert not out.any() and out.shape == labels.shape
    connected = clean_label_map(labels, connected=True)
    assert len(np.unique(connected)) == 1 + 8 + 1  # the background, eight islands of 1, one of 2


def test_a_map_that_is_one_region_stays_one():
    labels = np.full((7, 5), 3, dtype=np.int64)
    for area in (0, 2, labels.size, labels.size + 1):
        for connected in (False, True):
            out = clean_label_map(labels, min_region_area=area, connected=connected)
            assert np.unique(out).tolist() == ([3] if area <= 1 and not connected else [0]), (area, connected)
