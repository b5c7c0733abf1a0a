"""The voting rule on hand-made class maps and label maps.

Maps given at the label map's own size are used as they are (bilinear
resizing to the same size is the identity), so every vote can be counted by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffseg_core.class_vote as class_vote
from diffseg_core.class_vote import UNKNOWN, combine_class_attention, vote_classes


def _maps(*per_class):
    return torch.tensor(per_class, dtype=torch.float32)


def test_spatial_normalisation_decides_where_raw_scores_tie():
    # 2 classes on a 2 x 4 image; segment 0 = left half, segment 1 = right half.
    # raw: A 0.9 | 0.5, B 0.1 | 0.5 -> the right half is a tie in raw scores; after
    # L2 normalisation over the image B (norm sqrt(4*.01+4*.25)) beats A (sqrt(4*.81+4*.25)).
    a = [[0.9, 0.9, 0.5, 0.5]] * 2
    b = [[0.1, 0.1, 0.5, 0.5]] * 2
    labels = np.array([[0, 0, 1, 1]] * 2)
    voted = vote_classes(_maps(a, b), labels)
    assert voted.classes.tolist() == [0, 1]
    assert voted.scores.tolist() == [1.0, 1.0]


def test_majority_ties_go_to_the_class_listed_first_and_threshold_is_inclusive():
    # one segment of 4 pixels: two vote A, two vote B (maps mirror each other: equal norms)
    a = [[0.8, 0.8, 0.2, 0.2]]
    b = [[0.2, 0.2, 0.8, 0.8]]
    labels = np.zeros((1, 4), dtype=np.int64)
    voted = vote_classes(_maps(a, b), labels, threshold=0.5)
    assert voted.classes.tolist() == [0] and voted.scores.tolist() == [0.5]
    voted = vote_classes(_maps(b, a), labels, threshold=0.5)
    assert voted.classes.tolist() == [0]  # the first listed wins, whichever it is
    assert vote_classes(_maps(a, b), labels, threshold=0.51).classes.tolist() == [-1]


def test_unknown_below_threshold_and_class_map():
    # 3 classes, one pixel each strongly theirs, on a 1 x 5 image; segment 0 = pixels 0..2
    # (one vote each: share 1/3), segment 1 = pixels 3..4 (both vote C)
    a = [[0.8, 0.1, 0.1, 0.1, 0.1]]
    b = [[0.1, 0.8, 0.1, 0.1, 0.1]]
    c = [[0.1, 0.1, 0.8, 0.8, 0.8]]
    labels = np.array([[0, 0, 0, 1, 1]])
    voted = vote_classes(_maps(a, b, c), labels)
    assert voted.classes.tolist() == [-1, 2]
    np.testing.assert_allclose(voted.scores, [1 / 3, 1.0], rtol=1e-6)
    assert voted.class_map(labels).tolist() == [[UNKNOWN, UNKNOWN, UNKNOWN, 2, 2]]
    assert voted.class_map(labels).dtype == np.uint8
    low = vote_classes(_maps(a, b, c), labels, threshold=0.3)
    assert low.classes.tolist() == [0, 2]  # a three-way tie: the first listed


def test_mean_voting_can_differ_from_majority():
    # one segment of 4 pixels: 3 pixels lean slightly to B, one pixel is A by far.
    # Both maps have the same norm, so normalisation changes nothing here.
    a = [[0.45, 0.45, 0.45, 1.0]]
    b = [[0.55, 0.55, 0.55, 0.0]]
    # make the norms equal: add a fifth pixel (segment 1) that restores the balance
    a[0].append(0.0)
    b[0].append(float(np.sqrt(0.45**2 * 3 + 1.0 - 0.55**2 * 3)))
    labels = np.array([[0, 0, 0, 0, 1]])
    maps = _maps(a, b)
    norms = maps.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms[0], norms[1])
    majority = vote_classes(maps, labels, voting="majority", threshold=0.0)
    mean = vote_classes(maps, labels, voting="mean", threshold=0.0)
    assert majority.classes.tolist()[0] == 1 and majority.scores[0] == 0.75
    assert mean.classes.tolist()[0] == 0 and mean.scores[0] == 0.25  # its pixel share
    assert vote_classes(maps, labels, voting="mean").classes.tolist()[0] == -1  # 0.25 < 0.5


def test_absent_segment_ids_are_unknown():
    labels = np.array([[0, 0, 2, 2]])
    voted = vote_classes(_maps([[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]]), labels, num_segments=4)
    assert voted.classes.tolist() == [0, -1, 1, -1]
    assert voted.scores.tolist() == [1.0, 0.0, 1.0, 0.0]


def _brute_force(maps, labels, voting):
    """Full-size maps with torch's bilinear (half-pixel centres), normalised, argmax, counted."""
    H, W = labels.shape
    up = F.interpolate(maps[None].double(), size=(H, W), mode="bilinear", align_corners=False)[0]
    up = up / up.flatten(1).norm(dim=1)[:, None, None]
    best = up.argmax(0)
    k, c = int(labels.max()) + 1, maps.shape[0]
    lab = torch.from_numpy(labels)
    votes = torch.stack([torch.bincount(best[lab == s], minlength=c) for s in range(k)])
    if voting == "majority":
        winner = votes.argmax(1)
    else:
        winner = torch.stack([up[:, lab == s].sum(1) for s in range(k)]).argmax(1)
    share = votes.gather(1, winner[:, None])[:, 0].double() / votes.sum(1)
    return winner.numpy(), share.numpy()


@pytest.mark.parametrize("voting", ["majority", "mean"])
def test_upsampled_and_banded_votes_match_brute_force(voting, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 5, 7, generator=gen) ** 3  # (C, h, w), non-square and peaked
    maps = maps / maps.sum(0, keepdim=True)
    labels = np.random.RandomState(1).randint(0, 4, (6, 9))
    labels = np.kron(labels, np.ones((6, 5), dtype=np.int64))[:33, :41]  # blocky segments, 33 x 41
    monkeypatch.setattr(class_vote, "NMS_BAND_ELEMENTS", 6 * 41 * 4)  # bands of 4 rows
    voted = vote_classes(maps, labels, voting=voting, threshold=0.0)
    winner, share = _brute_force(maps, labels, voting)
    assert voted.classes.tolist() == winner.tolist()
    np.testing.assert_allclose(voted.scores, share, rtol=1e-6)


def test_combine_class_attention_is_weighted_bilinear_sum():
    gen = torch.Generator().manual_seed(2)
    att = {}
    for r in (8, 4, 2):
        m = torch.rand(2, r * r, 3, generator=gen)
        att[r] = m / m.sum(-1, keepdim=True)
    out = combine_class_attention(att)
    assert out.shape == (2, 3, 8, 8)
    expected = torch.zeros(2, 3, 8, 8)
    for r, w in ((8, 8 / 14), (4, 4 / 14), (2, 2 / 14)):
        grid = att[r].transpose(1, 2).reshape(2, 3, r, r)
        expected += w * F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 8, 8), atol=1e-6, rtol=0)  # still distributions


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"voting": "median"}, "majority, mean"),
        ({"threshold": 1.5}, r"in \[0, 1\]"),
        ({"threshold": -0.1}, r"in \[0, 1\]"),
    ],
)
def test_bad_voting_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vote_classes(_maps([[1.0]], [[0.0]]), np.zeros((1, 1), dtype=np.int64), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        vote_classes(torch.zeros(2, 2), np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="expected \\(B, 16, C\\)"):
        combine_class_attention({4: torch.zeros(1, 15, 3)})
    with pytest.raises(ValueError, match="disagree"):
        combine_class_attention({4: torch.zeros(1, 16, 3), 2: torch.zeros(1, 4, 2)})
