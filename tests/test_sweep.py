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
