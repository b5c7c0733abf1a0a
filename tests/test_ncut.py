"""The normalized-cut grouping (``DiffSeg(grouping="ncut")``): its kernels on graphs whose cut is
known, batching that changes nothing, its parameters' refusals, and the step on real models
(tiny-demo, learned; a tiny SDXL-shaped model with RANDOM weights: plumbing only)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffseg_core import ncut
from diffseg_core.grouping import cut_tokens, ncut_proposals
from diffseg_core.segmentor import DiffSeg


def _clusters(sizes: list[int], dim: int = 16, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(1, N, dim) tokens in len(sizes) tight clusters around orthogonal-ish centres, and their truth."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][: len(sizes)]
    truth = np.repeat(np.arange(len(sizes)), sizes)
    tokens = centres[torch.from_numpy(truth)] + noise * torch.randn(len(truth), dim, generator=g)
    perm = torch.randperm(len(truth), generator=g)  # members are not contiguous
    return tokens[perm][None], truth[perm.numpy()]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings group the items identically (up to the ids' names)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("threshold", [0.2, 0.5, "auto"])
def test_three_clusters_are_cut_into_exactly_three_segments(threshold):
    tokens, truth = _clusters([10, 20, 34])
    labels = ncut.recursive_ncut(ncut.affinity(tokens, 10.0), threshold)[0].numpy()
    assert _same_partition(labels, truth), (threshold, labels, truth)
    assert set(labels.tolist()) == {0, 1, 2}  # numbered without gaps


@pytest.mark.parametrize("threshold", [0.2, "auto"])
def test_one_cluster_is_never_cut(threshold):
    tokens, _ = _clusters([64], noise=0.02)
    labels = ncut.recursive_ncut(ncut.affinity(tokens, 10.0), threshold)
    assert labels.unique().tolist() == [0]


def test_a_higher_threshold_cuts_at_least_as_many_segments():
    tokens, _ = _clusters([12, 12, 20, 20], noise=0.4, seed=3)
    weights = ncut.affinity(tokens, 10.0)
    counts = [int(ncut.recursive_ncut(weights, t).max()) + 1 for t in (0.05, 0.3, 0.8, 1.5)]
    assert counts == sorted(counts) and counts[-1] > counts[0], counts


def test_a_batch_cuts_each_image_as_it_would_alone():
    graphs = [_clusters(sizes, seed=seed)[0] for seed, sizes in enumerate([[30, 34], [8, 16, 40], [64]])]
    weights = ncut.affinity(torch.cat(graphs), 10.0)
    for threshold in (0.5, "auto"):
        together = ncut.recursive_ncut(weights, threshold)
        for b in range(len(graphs)):
            alone = ncut.recursive_ncut(weights[b : b + 1], threshold)[0]
            assert torch.equal(together[b], alone), (threshold, b)  # integer ids: exact


def test_segment_scores_give_each_token_back_to_its_own_segment():
    tokens, truth = _clusters([10, 20, 34])
    labels = torch.from_numpy(truth)[None]
    scores = ncut.segment_scores(tokens, labels)[0]
    assert scores.shape == (3, 64) and float(scores.min()) >= 0 and float(scores.max()) <= 1
    assert torch.equal(scores.argmax(0), labels[0])


def test_attention_tokens_pool_queries_and_keys_to_the_token_budget():
    g = torch.Generator().manual_seed(0)
    attention = torch.softmax(torch.randn(2, 16 * 16, 16 * 16, generator=g), -1)
    tokens = ncut.attention_tokens(attention, max_tokens=64)
    assert tokens.shape == (2, 64, 64)
    # token (0, 0) of the 8 x 8 grid: queries (0,0),(0,1),(1,0),(1,1) of the 16 x 16 grid, keys likewise
    grid = attention.reshape(2, 16, 16, 16, 16)
    want = grid[:, :2, :2].mean((1, 2)).reshape(2, 8, 2, 8, 2).mean((2, 4)).flatten(1)
    torch.testing.assert_close(tokens[:, 0], want, rtol=1e-5, atol=1e-7)
    assert ncut.attention_tokens(attention, max_tokens=256).shape == (2, 256, 256)  # within budget: as it is


def test_proposals_from_block_attention_follow_the_blocks():
    """An attention map whose queries attend within their quadrant: four segments, one per quadrant."""
    side = 16
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    quadrant = torch.from_numpy((2 * (yy >= side // 2) + (xx >= side // 2)).ravel())
    same = (quadrant[:, None] == quadrant[None]).float() + 0.01
    attention = (same / same.sum(-1, keepdim=True))[None]
    proposals = ncut_proposals(attention, None, threshold="auto")[0]
    assert proposals.shape == (4, side, side)
    labels = proposals.argmax(0).ravel().numpy()
    assert _same_partition(labels, quadrant.numpy())


@pytest.mark.parametrize("kwargs, words", [
    ({"grouping": "kmeans"}, "grouping must be one of kl-merge, ncut, not 'kmeans'"),
    ({"grouping": "ncut", "ncut_threshold": 0}, "ncut_threshold must be auto or a number in (0, 2], not 0"),
    ({"grouping": "ncut", "ncut_threshold": 2.5}, "ncut_threshold must be auto or a number in (0, 2], not 2.5"),
    ({"grouping": "ncut", "ncut_threshold": "high"}, "not 'high'"),
    ({"grouping": "ncut", "ncut_affinity": "pixels"}, "ncut_affinity must be one of attention, features"),
    ({"grouping": "ncut", "ncut_alpha": -1}, "ncut_alpha must be a positive number, not -1"),
])
def test_bad_grouping_parameters_are_one_sentence(kwargs, words):
    with pytest.raises(ValueError) as caught:
        DiffSeg(**kwargs)
    assert words in str(caught.value)


def test_thresholds_that_must_still_be_accepted():
    for threshold in ("auto", 2, 2.0, 0.01, 1):
        assert DiffSeg(grouping="ncut", ncut_threshold=threshold).grouping == "ncut"


def test_the_features_affinity_without_features_says_so():
    maps = {8: torch.softmax(torch.randn(1, 64, 64), -1)}
    with pytest.raises(ValueError, match="needs the UNet's encoder features"):
        DiffSeg(grouping="ncut", ncut_affinity="features").proposals(maps)
    with pytest.raises(ValueError, match="square grid"):
        cut_tokens(None, torch.zeros(1, 4, 2, 3), "features")


def test_the_default_grouping_is_the_papers_merge():
    maps = {8: torch.softmax(torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1)), -1)}
    paper = DiffSeg(num_points=4).segment(maps, (32, 32))
    assert torch.equal(DiffSeg(num_points=4, grouping="kl-merge").segment(maps, (32, 32)), paper)
    assert DiffSeg().grouping == "kl-merge" and "grouping" not in repr(DiffSeg())


@pytest.fixture(scope="module")
def demo_scenes():
    from diffseg_core.demo_model.scenes import HELD_OUT_SEEDS, make_scene

    return [make_scene(HELD_OUT_SEEDS[k], (200, 300), textured=k % 2 == 1) for k in range(4)]


@pytest.mark.parametrize("affinity", ["attention", "features"])
def test_tiny_demo_labels_with_the_cut_at_each_image_size(demo_scenes, affinity):
    labeler = DiffSeg.from_pretrained("tiny-demo", grouping="ncut", ncut_affinity=affinity, boundaries="off")
    maps = labeler([s.image for s in demo_scenes])
    assert [m.shape for m in maps] == [(200, 300)] * 4
    assert all(m.min() == 0 and 2 <= m.max() + 1 <= 2 ** ncut.MAX_DEPTH for m in maps), [m.max() for m in maps]
    info = labeler.model_info["diffseg"]
    assert (info["grouping"], info["ncut_affinity"], info["ncut_threshold"]) == ("ncut", affinity, "auto")


def test_the_two_affinities_cut_different_tokens(demo_scenes):
    """The features reach the cut (a features run that quietly cut the attention would agree)."""
    images = [s.image for s in demo_scenes]
    by = {a: DiffSeg.from_pretrained("tiny-demo", grouping="ncut", ncut_affinity=a, boundaries="off")(images)
          for a in ("attention", "features")}
    assert any(not np.array_equal(a, f) for a, f in zip(by["attention"], by["features"]))


def test_an_sdxl_shaped_unet_gives_features_and_is_cut(tiny_sdxl_model_path):
    """RANDOM weights: the labels mean nothing; the shapes and the one pass are what is checked."""
    from diffseg_core.extract import AttentionExtractor

    extractor = AttentionExtractor.from_pretrained(tiny_sdxl_model_path, device="cpu", dtype="fp32")
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    extraction = extractor.extract(extractor.to_pixels(images))
    assert extractor.feature_layer_name.startswith("down_blocks.")
    assert extraction.features.ndim == 4 and extraction.features.shape[0] == 2
    assert extraction.features.shape[-1] == extraction.features.shape[-2]
    for affinity in ("attention", "features"):
        method = DiffSeg(num_points=2, grouping="ncut", ncut_affinity=affinity)
        proposals = method.proposals(extraction.self_attention, extraction.features)
        assert len(proposals) == 2 and all(p.ndim == 3 and p.shape[0] >= 1 for p in proposals)
        maps = method.label_maps(proposals, [(64, 64)] * 2)
        assert all(m.shape == (64, 64) for m in maps)


def test_the_cut_runs_where_the_kl_merges_anchor_grid_does_not_fit():
    """tiny-random at 64 px has 8 x 8 attention: the paper's 16 x 16 anchors do not fit, but the cut
    has no anchor grid, so it must not be refused for them (a check that narrows must keep this)."""
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="num_points=16"):
        DiffSeg.from_pretrained("tiny-random", image_size=64, num_points=16)
    maps = DiffSeg.from_pretrained("tiny-random", image_size=64, num_points=16, grouping="ncut")(images)
    assert [m.shape for m in maps] == [(64, 64)] * 2


def test_a_label_run_with_the_cut_is_not_refused_for_the_anchor_grid(ray_session, tmp_path):
    """The driver's checks (before Ray and after the model info) judge the anchor grid only for the KL merge."""
    import json

    from PIL import Image

    from pipeline.job.run import label

    (tmp_path / "in").mkdir()
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(
            tmp_path / "in" / f"{k}.png")
    summary = label(str(tmp_path / "in"), str(tmp_path / "out"), model="tiny-random", image_size=64,
                    num_points=16, grouping="ncut", batch_size=2)
    assert summary["complete"] and summary["errors"] == 0, summary
    parameters = json.loads((tmp_path / "out" / "_manifest.json").read_text())["parameters"]
    assert (parameters["grouping"], parameters["ncut_threshold"]) == ("ncut", "auto")


def test_features_are_pooled_to_the_token_budget_like_the_attention():
    features = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = cut_tokens(None, features, "features", max_tokens=256)
    assert tokens.shape == (1, 256, 8)
    torch.testing.assert_close(tokens[0, 0], features[0, :, :2, :2].mean((1, 2)))
    assert cut_tokens(None, features[..., :16, :16], "features", max_tokens=256).shape == (1, 256, 8)
