"""What the workers actually ran with, carried in their part records and checked by the driver.

The manifest records the options the driver was given; nothing there proves that a worker used
them (an option dropped on its way to the actors, a node with another package installed). So
each stage that changes a label says what it ran with, from its own state, not from what it was
asked:

- ``decode`` (read_decode): the size it resized to, its pixel limit, the paper's crop, the
  Parquet image column, and the package version on its node;
- ``model`` (LabelActor): the model, revision and weights (``model_weights``: a digest of their sha256s), the
  dtypes, size and timestep of its AttentionExtractor, and every parameter of its DiffSeg, as
  the actor resolved them (model-card defaults included), the vocabulary and class voting;
- ``encode`` (encode_rows): RLE and the class names it named segments with.

Each is one compact JSON string per batch, a column beside the rows (``_prov_<stage>``); the
sink folds the distinct ones of a part into its record (``provenance``). The driver compares a
record's provenance with the run's (:func:`expected`) once per distinct string (a set lookup
for every other record), and a mismatch stops the run before the shard is committed
(:class:`ProvenanceError`: one sentence naming the node, the field and both values). Committed
shards keep what their workers reported in their marker (``provenance``).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from functools import lru_cache
from typing import Any, Iterable, Sequence

from diffseg_core.parameters import ncut_threshold_value

STAGES = ("decode", "model", "encode")
COLUMNS = {stage: f"_prov_{stage}" for stage in STAGES}
#: Test hook: the package version a worker reports (a node with another install). Unset: the real one.
VERSION_ENV = "DIFFSEG_TEST_WORKER_VERSION"


@lru_cache(maxsize=1)
def _installed_version() -> str:
    from pipeline.data.manifest import package_version

    return package_version()


def worker_version() -> str:
    """The package version this worker runs (``DIFFSEG_TEST_WORKER_VERSION`` overrides it: tests)."""
    return os.environ.get(VERSION_ENV) or _installed_version()


@lru_cache(maxsize=1)
def worker_node() -> str:
    """Where this worker runs, as a person finds it: the node's IP (and Ray's node id, shortened)."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return f"{ray.util.get_node_ip_address()} ({ctx.get_node_id()[:8]})"
    except Exception:  # noqa: BLE001 - outside Ray (benchmarks, tests)
        pass
    return socket.gethostname()


def digest(value: Any) -> str | None:
    """A short stable digest of a JSON-able value (None stays None)."""
    if value is None:
        return None
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _encode(stage: str, fields: dict[str, Any]) -> str:
    body = {"stage": stage, "node": worker_node(), "version": worker_version(), **fields}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def decode_provenance(*, image_size: int, max_pixels: int, paper_preprocess: bool, image_column: str | None) -> str:
    return _encode("decode", {"image_size": int(image_size), "max_pixels": int(max_pixels),
                              "paper_preprocess": bool(paper_preprocess), "image_column": image_column})


def model_provenance(extractor: Any, diffseg: Any, class_voting: str, class_threshold: float) -> str:
    """From the actor's own AttentionExtractor and DiffSeg (what it runs, not what it was given)."""
    info = extractor.model_info
    vocabulary = extractor.vocabulary
    return _encode("model", {
        "model": info.get("model"),
        "revision": info.get("revision"),
        "model_weights": digest(info.get("weights_sha256")),  # not "weights": DiffSeg's weights have that name
        "dtype": str(extractor.dtype).removeprefix("torch."),
        "vae_dtype": str(extractor.vae_dtype).removeprefix("torch."),
        "image_size": int(extractor.image_size),
        "timestep": int(extractor.timestep),
        **method_fields(diffseg),
        "vocabulary": digest(list(vocabulary.names)) if vocabulary is not None else None,
        "class_voting": class_voting if vocabulary is not None else None,
        "class_threshold": float(class_threshold) if vocabulary is not None else None,
    })


def method_fields(diffseg: Any) -> dict[str, Any]:
    """DiffSeg's parameters as the object holds them."""
    return _method(diffseg.thresholds, diffseg.num_points, diffseg.refine, diffseg.weights, diffseg.boundaries,
                   diffseg.pamr_iterations, diffseg.pamr_dilations, diffseg.min_region_area, diffseg.connected,
                   diffseg.grouping, diffseg.ncut_threshold, diffseg.ncut_affinity)


def _method(thresholds: Sequence[float], num_points: int, refine: bool, weights: Sequence[float] | None,
            boundaries: str | None, pamr_iterations: int, pamr_dilations: Sequence[int], min_region_area: int,
            connected: bool, grouping: str, ncut_threshold: float | str, ncut_affinity: str) -> dict[str, Any]:
    """The method fields of a report, in the one form both sides compare (PAMR's only when on, the
    cut's only with ncut)."""
    on = (boundaries or "off") != "off"
    cut = grouping == "ncut"
    return {
        "kl_threshold": [float(t) for t in thresholds],
        "num_points": int(num_points),
        "refine": bool(refine),
        "weights": [float(w) for w in weights] if weights is not None else None,
        "boundaries": boundaries or "off",
        "pamr_iterations": int(pamr_iterations) if on else None,
        "pamr_dilations": [int(d) for d in pamr_dilations] if on else None,
        "min_region_area": int(min_region_area),
        "connected": bool(connected),
        "grouping": grouping,
        "ncut_threshold": ncut_threshold_value(ncut_threshold) if cut else None,
        "ncut_affinity": ncut_affinity if cut else None,
    }


def encode_provenance(*, rle: bool, class_names: Sequence[str] | None) -> str:
    return _encode("encode", {"rle": bool(rle),
                              "class_names": digest(list(class_names)) if class_names is not None else None})


def expected(opts: Any, *, image_size: int, dtype: str, model_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What every worker of this run must report, per stage (fields absent here are not compared)."""
    from diffseg_core.parameters import method_thresholds

    # from the options themselves, never from what is handed to the workers (that path is what is checked)
    filled = opts.with_model_defaults()
    kl = filled.kl_threshold
    thresholds = method_thresholds(list(kl) if isinstance(kl, (list, tuple)) else kl, filled.num_points,
                                   None if isinstance(kl, (list, tuple)) else filled.iterations)
    method = _method(thresholds, filled.num_points, filled.refine, filled.weights, filled.boundaries,
                     filled.pamr_iterations, filled.pamr_dilations, filled.min_region_area, filled.connected,
                     filled.grouping, filled.ncut_threshold, filled.ncut_affinity)
    vocab = opts.resolved_vocabulary()  # read once, by the options the driver was given
    model: dict[str, Any] = {
        "model": model_info.get("model"),
        "revision": model_info.get("revision"),
        "model_weights": digest(model_info.get("weights_sha256")),
        "dtype": _dtype_name(dtype),
        "image_size": int(image_size),
        "timestep": int(filled.timestep),
        **method,
        "vocabulary": digest(list(vocab.names)) if vocab is not None else None,
        "class_voting": filled.class_voting if vocab is not None else None,
        "class_threshold": float(filled.class_threshold) if vocab is not None else None,
    }
    if filled.vae_dtype not in (None, "auto"):  # "auto" depends on the device and the VAE's config
        model["vae_dtype"] = _dtype_name(filled.vae_dtype)
    version = _installed_version()
    return {
        "decode": {"version": version, "image_size": int(image_size), "max_pixels": int(filled.max_pixels),
                   "paper_preprocess": bool(filled.paper_preprocess), "image_column": filled.image_column},
        "model": {"version": version, **model},
        "encode": {"version": version, "rle": bool(filled.rle),
                   "class_names": digest(list(vocab.names)) if vocab is not None else None},
    }


def _dtype_name(dtype: str) -> str:
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(str(dtype), str(dtype))


def fold(values: Iterable[Any]) -> str:
    """A part's provenance: the distinct stage strings of its rows, as one JSON list (sorted)."""
    return "[" + ",".join(sorted({v for v in values if isinstance(v, str)})) + "]"


class ProvenanceError(RuntimeError):
    """A worker ran with something other than the run's settings. One sentence."""


class ProvenanceCheck:
    """Compares records' provenance with the run's; remembers the strings already found good."""

    def __init__(self, want: dict[str, dict[str, Any]]):
        self.want = json.loads(json.dumps(want))  # tuples as lists, as the workers' JSON has them
        self.good: dict[str, list[dict[str, Any]]] = {}

    def check(self, provenance: str | None, shard_id: int) -> list[dict[str, Any]]:
        """The record's stage reports (parsed once per distinct string); ProvenanceError on a mismatch."""
        if provenance is None:
            raise ProvenanceError(f"a worker sent rows of shard {shard_id} without saying what it ran with (an "
                                  f"older diffseg-labeler on a node?); shard {shard_id} is left uncommitted. "
                                  f"Install diffseg-labeler {_installed_version()} on every node, then rerun the "
                                  "same command to resume.")
        known = self.good.get(provenance)
        if known is not None:
            return known
        reports = json.loads(provenance)
        seen = {r.get("stage") for r in reports}
        for stage in STAGES:
            if stage not in seen:
                raise ProvenanceError(f"no {stage} report came with rows of shard {shard_id}; shard {shard_id} is "
                                      "left uncommitted (a worker running another diffseg-labeler?).")
        for report in reports:
            for key, value in self.want.get(report.get("stage"), {}).items():
                got = report.get(key, "(not reported)")
                if got != value:
                    raise ProvenanceError(_mismatch(report, key, got, value, shard_id))
        self.good[provenance] = reports
        return reports


def _mismatch(report: dict[str, Any], key: str, got: Any, want: Any, shard_id: int) -> str:
    stage = report.get("stage")
    where = {"decode": "a read/decode task", "model": "a model actor", "encode": "an encode task"}.get(stage, stage)
    if key == "version":
        fix = (f"install diffseg-labeler {want} on every node (or fix the job's runtime_env), then rerun the same "
               "command to resume")
    elif key in ("model", "revision", "model_weights"):
        fix = "give every node the same model files, then rerun the same command to resume"
    else:
        fix = "the workers were not given this run's settings, a bug in diffseg-labeler: please report this line"
    return (f"{where} on node {report.get('node')} ran with {key} = {json.dumps(got)}, but this run's {key} is "
            f"{json.dumps(want)}; shard {shard_id} is left uncommitted and the run stops ({fix}).")
