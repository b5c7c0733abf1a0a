"""DiffSeg's method parameters, judged without torch: the bounds live here, once.

``DiffSeg(...)`` calls `method_thresholds`; so do the labeling job's driver and the
job-spec checker, which must refuse a bad option in a second, before importing torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["BOUNDARY_MODES", "DEFAULT_ITERATIONS", "method_thresholds", "anchor_grid_problem", "weights_problem",
           "boundaries_problem", "GROUPINGS", "KL_MERGE", "NCUT_AFFINITIES", "grouping_problem", "ncut_threshold_value"]

DEFAULT_ITERATIONS = 3


def method_thresholds(
    kl_threshold: float | Sequence[float], num_points: Any, iterations: int | None = None
) -> list[float]:
    """One KL threshold per merging iteration; raise ValueError (one sentence) for parameters no run can use."""
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if isinstance(kl_threshold, (int, float)):
        values = [float(kl_threshold)] * (iterations or DEFAULT_ITERATIONS)
    else:
        values = [float(v) for v in kl_threshold]
        if not values:
            raise ValueError("kl_threshold: an empty sequence gives no iteration")
        if iterations is not None and iterations != len(values):
            raise ValueError(
                f"kl_threshold has {len(values)} values (one per iteration) but iterations={iterations}"
            )
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise ValueError(f"kl_threshold must be positive and finite, got {bad}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    return values


def anchor_grid_problem(num_points: int, resolutions: Sequence[int], model: Any, image_size: int,
                        grouping: str = "kl-merge") -> str | None:
    """Why DiffSeg's anchor grid cannot run on this model's attention, or None if it can (always
    with ``grouping="ncut"``: the cut has no anchor grid)."""
    finest = max(resolutions) if resolutions else 0
    if num_points <= finest or grouping == "ncut":
        return None
    return (
        f"num_points={num_points} needs self-attention maps of at least {num_points} x {num_points}, "
        f"but model {str(model)!r} at image size {image_size} gives {finest} x {finest}: "
        f"use num_points {finest} or less, or a larger image size"
    )


def weights_problem(weights: Sequence[float] | None, resolutions: Sequence[int] | None = None,
                    model: Any = None) -> str | None:
    """Why aggregation weights (one per resolution, finest first; None = proportional) cannot be
    used, on a model with these attention ``resolutions`` when given, or None if they can."""
    if weights is None:
        return None
    values = list(weights)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                         for v in values) or sum(values) <= 0:
        return f"weights must be non-negative numbers, not all zero, not {values!r}"
    if resolutions is not None and len(values) != len(resolutions):
        res = sorted(resolutions, reverse=True)
        who = f"model {str(model)!r}" if model is not None else "the model"
        return (f"{len(values)} weights given, but {who} has {len(res)} attention resolutions {res} "
                "(one weight each, finest first)")
    return None


#: --boundaries values: "off" (the paper's method) or "pamr".
BOUNDARY_MODES = ("off", "pamr")


def boundaries_problem(mode: object, iterations: object, dilations: object) -> str | None:
    """One sentence saying what is wrong with PAMR's parameters, or None."""
    if mode not in BOUNDARY_MODES:
        return f"boundaries must be one of {', '.join(BOUNDARY_MODES)}, not {mode!r}"
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        return f"pamr_iterations must be a whole number of at least 1, not {iterations!r}"
    try:
        values = list(dilations)  # type: ignore[call-overload]
    except TypeError:
        return f"pamr_dilations must be a list of whole numbers of at least 1, not {dilations!r}"
    if not values or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in values):
        return f"pamr_dilations must be a non-empty list of whole numbers of at least 1, not {dilations!r}"
    return None


#: --grouping values: "kl-merge" (the paper's merge of attention maps by KL divergence) or "ncut"
#: (a recursive normalized cut of a token affinity, `diffseg_core.grouping`).
KL_MERGE = "kl-merge"  # the default: the paper's
GROUPINGS = (KL_MERGE, "ncut")
#: --ncut-affinity values: what the cut's tokens are (see `diffseg_core.grouping`).
NCUT_AFFINITIES = ("attention", "features")


def ncut_threshold_value(threshold: float | str) -> float | str:
    """The cut's threshold in the one form everything records and compares: "auto", or a float."""
    return threshold if threshold == "auto" else float(threshold)


def grouping_problem(grouping: object, threshold: object = "auto", affinity: object = "attention",
                     alpha: object = 10.0) -> str | None:
    """One sentence saying what is wrong with the grouping's parameters, or None."""
    if grouping not in GROUPINGS:
        return f"grouping must be one of {', '.join(GROUPINGS)}, not {grouping!r}"
    if affinity not in NCUT_AFFINITIES:
        return f"ncut_affinity must be one of {', '.join(NCUT_AFFINITIES)}, not {affinity!r}"
    if threshold != "auto" and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                or not math.isfinite(threshold) or not 0 < threshold <= 2):
        return f"ncut_threshold must be auto or a number in (0, 2], not {threshold!r}"
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        return f"ncut_alpha must be a positive number, not {alpha!r}"
    return None
