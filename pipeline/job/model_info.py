"""The model's provenance (what the manifest records and a rerun is checked against) once the
cluster has said GPUs or CPUs: from the model's configs (preflight read them), or, for single-file
checkpoints whose configs only a load reveals, from ``probe_model`` in a Ray task, never in the driver.
"""
from __future__ import annotations

from typing import Any

from pipeline.errors import LabelError, one_line
from pipeline.job.devices import DevicePlan
from pipeline.job.options import LabelOptions
from pipeline.job.preflight import Checked

__all__ = ["model_info", "probe_model"]


def model_info(ray: Any, checked: Checked, opts: LabelOptions, dtype: str,
               devices: DevicePlan) -> tuple[dict[str, Any], int]:
    """The model's provenance and image size: from its configs, or (single-file checkpoints,
    whose configs only a load reveals) from a probe in a Ray task, never in the driver."""
    from diffseg_core.parameters import anchor_grid_problem, weights_problem

    if checked.model.complete:
        return checked.model_info(opts, dtype, devices.use_gpu), checked.image_size
    probe = ray.remote(num_cpus=1, max_retries=0)(probe_model)
    vocab = opts.resolved_vocabulary()  # a checkpoint holds no tokenizer alone: judged as it loads
    info = ray.get(probe.remote(opts.model, dtype=dtype, image_size=opts.image_size, timestep=opts.timestep,
                                revision=opts.revision,
                                allow_unsafe_weights=bool(opts.allow_unsafe_weights),
                                vocabulary=list(vocab.names) if vocab is not None else None))
    if "error" in info:
        raise LabelError(f"Cannot load model {opts.model!r}: {info['error']}")
    info["device"] = "cuda" if devices.use_gpu else "cpu"
    problem = anchor_grid_problem(opts.num_points, info["attention_resolutions"], opts.model, info["image_size"],
                                  opts.grouping)
    if problem:
        raise LabelError(f"DiffSeg cannot run on this model: {problem} (--num-points, --image-size).")
    problem = weights_problem(opts.weights, info["attention_resolutions"], opts.model)
    if problem:
        raise LabelError(f"--weights: {problem}.")
    return info, int(info["image_size"])


def probe_model(model: str, **kwargs: Any) -> dict[str, Any]:
    """Load a model on CPU and return its provenance (`AttentionExtractor.model_info`), or
    ``{"error": one line}``; runs in a Ray task."""
    from diffseg_core.extract import AttentionExtractor, ModelLoadError
    from diffseg_core.model_loading import quiet_loading

    try:
        with quiet_loading():
            return AttentionExtractor.from_pretrained(model, device="cpu", **kwargs).model_info
    except ModelLoadError as exc:
        return {"error": one_line(exc.what)}
    except Exception as exc:  # noqa: BLE001 - a bad size or dtype, a broken file: one line for the driver
        return {"error": f"{type(exc).__name__}: {one_line(exc)}"}
