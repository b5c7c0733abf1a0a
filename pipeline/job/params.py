"""``diffseg label --params FILE``: DiffSeg's method parameters from a JSON file.

The file is ``diffseg tune``'s ``best.json`` (its ``label_params`` part is read)
or a plain object with the same keys. Flags given on the command line win over
the file (pipeline.cli). Values are checked here with one sentence per problem;
the bounds that DiffSeg itself judges (positive tau, a 2 x 2 grid at least) are
judged by it when label() starts.
"""
from __future__ import annotations

import json
import math
from typing import Any

from pipeline.errors import LabelError

METHOD_PARAMS = ("kl_threshold", "iterations", "num_points", "refine", "weights", "boundaries", "pamr_iterations",
                 "pamr_dilations", "grouping", "ncut_threshold", "ncut_affinity")
TUNE_KEY = "label_params"  # where diffseg tune's best.json keeps them
FRAME_KEY = "extraction"  # best.json: the model and frame the parameters were chosen on
# label options that best.json's extraction block gives (label's name -> tune's name)
FRAME_OPTIONS = {"model": "model", "revision": "revision", "image_size": "image_size_given",
                 "timestep": "timestep", "paper_preprocess": "paper_preprocess"}


def read_frame(path: str) -> dict[str, Any]:
    """The model and frame a ``diffseg tune`` best.json was tuned on, as label options ({} for a plain file).

    Only values that differ from nothing: a frame value of None (e.g. no --image-size given to tune) is left out.
    """
    with open(path) as f:  # read_params has already judged the file
        doc = json.load(f)
    frame = doc.get(FRAME_KEY) if isinstance(doc, dict) and isinstance(doc.get(TUNE_KEY), dict) else None
    if not isinstance(frame, dict):
        return {}
    return {option: frame[key] for option, key in FRAME_OPTIONS.items() if frame.get(key) is not None}


def read_params(path: str) -> dict[str, Any]:
    """The method parameters in ``path``; LabelError (one sentence) when the file cannot be used."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        raise LabelError(f"--params {path}: cannot read it ({exc.strerror or exc}).") from None
    except ValueError as exc:
        raise LabelError(f"--params {path}: not JSON ({exc}).") from None
    if isinstance(doc, dict) and isinstance(doc.get(TUNE_KEY), dict):
        doc = doc[TUNE_KEY]
    if not isinstance(doc, dict):
        raise LabelError(f"--params {path}: expected a JSON object with {', '.join(METHOD_PARAMS)}.")
    unknown = sorted(set(doc) - set(METHOD_PARAMS))
    if unknown:
        raise LabelError(f"--params {path}: unknown key(s) {unknown}; it may hold {', '.join(METHOD_PARAMS)}.")
    return {key: _check(path, key, value) for key, value in doc.items()}


def _check(path: str, key: str, value: Any) -> Any:
    def bad(expected: str) -> LabelError:
        return LabelError(f"--params {path}: {key} must be {expected}, not {value!r}.")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if key == "kl_threshold":
        if number(value):
            return float(value)
        if isinstance(value, list) and value and all(number(v) for v in value):
            return [float(v) for v in value]
        raise bad("a number or a non-empty list of numbers")
    if key == "boundaries":
        if isinstance(value, str):
            return value  # off / pamr: judged with the other options when label() starts
        raise bad("off or pamr")
    if key in ("grouping", "ncut_affinity"):
        if isinstance(value, str):
            return value  # judged with the other options when label() starts
        raise bad("kl-merge or ncut" if key == "grouping" else "attention or features")
    if key == "ncut_threshold":
        if value == "auto" or number(value):
            return value if value == "auto" else float(value)
        raise bad("auto or a number")
    if key == "pamr_dilations":
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise bad("a non-empty list of integers")
    if key in ("iterations", "num_points", "pamr_iterations"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if key == "refine":
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if value is None:  # weights: null is the default (proportional to the resolution)
        return None
    if isinstance(value, list) and value and all(number(v) for v in value):
        return [float(v) for v in value]
    raise bad("null or a list of numbers (one per attention resolution, finest first)")
