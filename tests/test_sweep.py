"""diffseg_core.sweep: many settings from one pass give what DiffSeg gives for each one."""
from __future__ import annotations

import pytest
import torch

from diffseg_core import DiffSeg, aggregate_attention
from diffseg_core.merge import labels_from_proposals
from diffseg_core.sweep import sweep_proposals
from tests.synthetic_attention import planted_maps
from tests.tolerances import ATTENTION, SAME_LABELS

SCHEDULES = [(0.5,), (0.5, 0.5), (0.5, 0.5, 0.5), (1.1, 1.1, 1.1), (1.1, 1.0), (1.1, 1.0, 0.9), (1.6, 1.2)]


@pytest.mark.parametrize("num_points", [4, 8])
def test_every_setting_of_a_sweep_matches_diffseg_on_its_own(num_points):
    maps, _ = planted_maps((16, 8), regions=5, seed=4)
    aggregate = aggregate_attention(maps, [1.0, 3.0])
    got = {(s, r): p for s, r, p in sweep_proposals(aggregate, num_points, SCHEDULES, refine=(False, True))}
    assert set(got) == {(s, r) for s in SCHEDULES for r in (False, True)}
    for (schedule, refine), proposals in got.items():
        alone = DiffSeg(kl_threshold=list(schedule), num_points=num_points, refine=refine)
        expected = alone.proposals_from_aggregate(aggregate)[0]
        assert proposals.shape == expected.shape
        torch.testing.assert_close(proposals, expected, **ATTENTION)
        same = labels_from_proposals(proposals, (24, 24)) == labels_from_proposals(expected, (24, 24))
        assert same.float().mean() >= SAME_LABELS


def test_repeated_schedules_come_once_and_bad_ones_are_refused():
    maps, _ = planted_maps((8,), regions=3)
    aggregate = aggregate_attention(maps)
    assert len(list(sweep_proposals(aggregate, 4, [(1.0,), (1.0,), [1.0]]))) == 1
    with pytest.raises(ValueError, match="positive"):
        list(sweep_proposals(aggregate, 4, [(1.0, -0.1)]))
    with pytest.raises(ValueError, match="one image"):
        list(sweep_proposals(torch.ones(2, 64, 64) / 64, 4, [(1.0,)]))


def test_the_search_scores_the_labels_diffseg_label_writes(tmp_path):
    """pipeline.tune.score (one Ray task's work) against DiffSeg.segment + SegmentationMetrics, setting by
    setting, on the same cached maps: one-iteration schedules leave many proposals (label ids with gaps
    before compaction); classes absent from an image (8 classes, 5 planted) are matched to a segment
    only when the ids have no gaps, so a scorer that skipped label's compaction was 20 mIoU points off."""
    import numpy as np

    from diffseg_core import SegmentationMetrics
    from pipeline.tune.cache import AttentionCache, load_maps
    from pipeline.tune.grid import Grid, settings as grid_settings, weight_values
    from pipeline.tune.score import score_chunk
    from pipeline.tune.search import group_settings

    resolutions = [16, 8]
    cache = AttentionCache(tmp_path)
    paths, targets = [], []
    for seed in range(3):
        maps, truth = planted_maps(tuple(resolutions), regions=5, seed=seed)
        paths.append(str(cache.put(f"img{seed}", {r: m.mean(1) for r, m in maps.items()}, {})))
        targets.append(truth[0].repeat_interleave(2, 0).repeat_interleave(2, 1).numpy().astype(np.int16))
    grid = Grid(taus=[0.3, 0.7, 1.1], iterations=[1, 2, 3], tau_steps=[0.0], num_points=[8], weights=["proportional"],
                groupings=["kl-merge"])  # the cut is scored against DiffSeg in tests/test_tune_ncut.py
    settings, _ = grid_settings(grid, resolutions, "planted", 128)
    (group, members), = group_settings(settings, resolutions)
    part = score_chunk(paths, targets, [0] * len(paths), group, 8, 1)
    for row, index in enumerate(members):
        s = settings[index]
        alone = DiffSeg(kl_threshold=list(s.thresholds), num_points=s.num_points, weights=weight_values(s.weights, resolutions))
        expected = SegmentationMetrics(8)
        for path, target in zip(paths, targets):
            expected.update(alone.segment({r: m.float() for r, m in load_maps(path).items()}, (32, 32))[0].numpy(), target)
        tp, fp, fn = part["counts"][row, 0]
        got = SegmentationMetrics.from_dict({"num_classes": 8, "tp": tp, "fp": fp, "fn": fn, "num_images": 3,
                                             "labelled_pixels": int(tp.sum() + fn.sum())})
        assert got.miou() == pytest.approx(expected.miou(), abs=0.005), s.describe()
        assert got.pixel_accuracy() == pytest.approx(expected.pixel_accuracy(), abs=0.005), s.describe()
