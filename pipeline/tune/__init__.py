"""``diffseg tune``: choose DiffSeg's parameters on a small labelled sample.

    from pipeline.tune import tune
    report = tune("images/", "ground_truth/", "masks", num_classes=5, model="tiny-random", out="tune")

Modules: grid (settings), cache (per-image attention on disk), prepare (sample,
cache fill, ground truth), score (one Ray task's work), search (the Ray fan-out),
select (in-sample best and k-fold estimate), report (outputs), run (``tune()``),
cli (the subcommand).
"""
from __future__ import annotations

from typing import Any

__all__ = ["tune"]


def tune(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`pipeline.tune.run.tune` (imported on first use: it pulls in torch)."""
    from pipeline.tune.run import tune as _tune

    return _tune(*args, **kwargs)
