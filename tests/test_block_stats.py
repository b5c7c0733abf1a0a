"""The driver keeps a bounded number of Ray Data block stats per operator, however long the run
(pipeline/job/block_stats.py): real Ray Data executions, their operators inspected after the
stream."""
from __future__ import annotations

import collections

import pytest


@pytest.fixture
def operators():
    """Every Ray Data map operator made while the test runs (the bound installed first, so the
    spy wraps it and taking the spy away leaves it)."""
    from ray.data._internal.execution.operators.map_operator import MapOperator

    from pipeline.job.block_stats import bound_block_stats

    bound_block_stats()
    made = []
    original = MapOperator.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    MapOperator.__init__ = spy
    try:
        yield made
    finally:
        MapOperator.__init__ = original


def test_map_operators_keep_at_most_the_limit_of_block_stats(ray_session, operators):
    import ray

    from pipeline.job.block_stats import KEPT_BLOCK_STATS, bound_block_stats

    bound_block_stats(limit=7)
    try:
        ds = ray.data.range(400, override_num_blocks=100).map_batches(lambda b: {"id": b["id"] * 2}, batch_size=4)
        rows = sum(len(b["id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
        assert rows == 400
        assert operators, "Ray Data made no MapOperator: pipeline/job/block_stats.py no longer reaches its stats"
        for op in operators:
            kept = op._output_blocks_stats  # the list Ray Data grows by one per output block
            assert isinstance(kept, collections.deque) and kept.maxlen == 7
            assert len(kept) == 7  # 100 blocks went through: only the latest 7 are kept
        assert "Operator" in ds.stats()  # Ray Data's own summary still works on what is kept
    finally:
        bound_block_stats(limit=KEPT_BLOCK_STATS)


def test_a_label_runs_operators_are_bounded(ray_session, tmp_path, operators):
    from pipeline import label
    from pipeline.job.block_stats import KEPT_BLOCK_STATS
    from pipeline_helpers import FAST, make_photo_folder

    make_photo_folder(tmp_path / "in")
    assert label(str(tmp_path / "in"), str(tmp_path / "out"), **FAST)["complete"]
    assert len(operators) >= 4  # read, decode, the model actors, encode + write
    assert all(isinstance(op._output_blocks_stats, collections.deque)
               and op._output_blocks_stats.maxlen == KEPT_BLOCK_STATS for op in operators)
