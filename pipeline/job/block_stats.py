"""Keep the driver's Python heap flat over a long run: bound Ray Data's per-block statistics.

Ray Data's map operators keep one ``BlockStats`` for every block they have ever output, until
the dataset ends (ray-project/ray#66016, open): the driver's Python heap grows with the images
(BENCHMARKS.md, "Driver memory after the bound": +262 objects and 0.2 MB of RSS per 10,000
images at batch 32, flat with the bound). They are read only to print the stats summary at
the end, so keeping the most recent ``limit`` per operator loses nothing a run needs; that
summary then describes those blocks. No Ray Data setting reaches it (as of Ray 2.60), hence
this patch of the operators' one list: if a Ray release renames it, nothing here breaks and
``tests/test_block_stats.py`` fails, so the change is seen.
"""
from __future__ import annotations

import collections
import functools

KEPT_BLOCK_STATS = 1000  # per operator


def bound_block_stats(limit: int = KEPT_BLOCK_STATS) -> None:
    """Make every Ray Data map operator created from now on in this process keep at most
    ``limit`` block stats (the latest). Idempotent: a second call only sets the limit."""
    from ray.data._internal.execution.operators.map_operator import MapOperator

    if getattr(MapOperator, "_diffseg_block_stats_limit", None) is not None:
        MapOperator._diffseg_block_stats_limit = limit
        return
    original = MapOperator.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):  # noqa: N807 - the wrapped constructor
        original(self, *args, **kwargs)
        kept = getattr(self, "_output_blocks_stats", None)
        if isinstance(kept, list):
            self._output_blocks_stats = collections.deque(kept, maxlen=MapOperator._diffseg_block_stats_limit)

    MapOperator.__init__ = __init__
    MapOperator._diffseg_block_stats_limit = limit
