"""DiffSeg's parameters when the caller leaves them out: the model's own, else the paper's.

The paper's values (tau 1.1, a 16 x 16 anchor grid, 3 iterations, aggregation
weights proportional to resolution) suit Stable Diffusion. A local diffusers
folder may ship other defaults in its model card (``diffseg.json``, key
``defaults``); ``tiny-demo`` does. An option the caller sets always wins.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from diffseg_core.model_check import MODEL_CARD, ModelLoadError, read_model_card
from diffseg_core.parameters import boundaries_problem, weights_problem
from diffseg_core.tiny_model import TINY_DEMO, tiny_demo_path

__all__ = ["PAPER_DEFAULTS", "model_method_defaults", "with_method_defaults"]

#: ``weights`` None: proportional to each attention resolution (the paper's aggregation).
#: ``boundaries`` "off": no refinement (the paper's method); PAMR's iterations and dilations are
#: the PAMR paper's, used when a caller or a card turns it on.
PAPER_DEFAULTS: dict[str, Any] = {"kl_threshold": 1.1, "num_points": 16, "iterations": 3, "weights": None,
                                  "boundaries": "off", "pamr_iterations": 10, "pamr_dilations": [1, 2, 4, 8, 12, 24]}


def model_method_defaults(model: str | os.PathLike) -> dict[str, Any]:
    """The paper's defaults, overridden by the model card's ``defaults`` (read from disk only:
    no model is loaded or built, and hub ids get the paper's)."""
    name = os.fspath(model)
    folder = tiny_demo_path() if name == TINY_DEMO else Path(name).expanduser()
    card = read_model_card(folder, name) if folder.is_dir() else {}
    given = card.get("defaults") or {}
    unknown = sorted(set(given) - set(PAPER_DEFAULTS)) if isinstance(given, dict) else ["(not an object)"]
    if unknown:
        raise ModelLoadError(name, f"its {MODEL_CARD} 'defaults' has keys DiffSeg does not take: {', '.join(unknown)}; "
                                   f"allowed: {', '.join(PAPER_DEFAULTS)}.")
    problem = weights_problem(given.get("weights"))
    if not problem and any(k in given for k in ("boundaries", "pamr_iterations", "pamr_dilations")):
        merged = {**PAPER_DEFAULTS, **given}
        problem = boundaries_problem(merged["boundaries"], merged["pamr_iterations"], merged["pamr_dilations"])
    if problem:
        raise ModelLoadError(name, f"its {MODEL_CARD} 'defaults': {problem}.")
    return {**PAPER_DEFAULTS, **given}


def with_method_defaults(model: str | os.PathLike, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` DiffSeg keyword arguments (None = not given) completed with the model's defaults.

    A ``kl_threshold`` list sets the number of iterations itself (one per
    value), so the default ``iterations`` beside one is its length.
    """
    out = {k: v for k, v in given.items() if v is not None}
    defaults = model_method_defaults(model)
    if isinstance(out.get("kl_threshold"), (list, tuple)):
        defaults["iterations"] = len(out["kl_threshold"])
    for key, value in defaults.items():
        out.setdefault(key, value)
    return out
