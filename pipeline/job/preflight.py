"""Everything a run can check before Ray starts: a wrong path or option costs a second, not Ray's start-up.

In order, cheapest and most likely to fail first; nothing is written until the last:

  1. the model: found, complete, readable configs and weight headers (no weights loaded);
  2. the image size and the anchor grid against the model's attention resolutions; a
     vocabulary against the model's tokenizer (loaded alone);
  3. the output's manifest: a rerun must use the same input and label parameters;
  4. the weights' sha256 (cached per file) against the manifest's model;
  5. the input: at least one input file (the first one found; the full listing streams later);
  6. the output is writable (the only step that writes: a probe file, removed at once).

The options themselves were judged by ``validate_options`` before this. What needs
the cluster (GPUs or CPUs, hence the default dtype; single-file checkpoints, whose
configs only a load reveals) is settled after ``ray.init``; see pipeline/job/run.py.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.data.manifest import (
    IncompatibleOutputError,
    check_compatible,
    recover_manifest,
)
from pipeline.data.sources import NoInputError, first_input, input_root, open_fs
from pipeline.errors import LabelError, one_line
from pipeline.job.options import LabelOptions
from pipeline.job.vocab import check_against_model

if TYPE_CHECKING:  # pragma: no cover
    import fsspec

    from diffseg_core.model_check import ModelCheck

__all__ = ["Checked", "preflight", "known_device", "default_dtype"]


def default_dtype(use_gpu: bool) -> str:
    return "fp16" if use_gpu else "fp32"


def known_device(opts: LabelOptions) -> str | None:
    """"gpu" or "cpu" when the options alone decide it, None when the cluster does (--device auto)."""
    if opts.device in ("gpu", "cpu"):
        return opts.device
    if opts.gpus_per_actor is not None:
        return "gpu" if opts.gpus_per_actor > 0 else "cpu"
    return None


@dataclass
class Checked:
    """What the checks found: what the rest of the run starts from."""

    input: str
    output: str
    input_root: str
    out_fs: "fsspec.AbstractFileSystem"
    out_root: str
    model: "ModelCheck"
    image_size: int
    weights_sha256: dict[str, str] | None
    previous: dict[str, Any] | None  # the output's manifest, None for a new output or --overwrite
    created_output: bool  # this run made the output folder (removed again if the run cannot start)

    def model_info(self, opts: LabelOptions, dtype: str, use_gpu: bool) -> dict[str, Any]:
        return self.model.model_info(dtype=dtype, timestep=opts.timestep, image_size=self.image_size,
                                     weights_sha256=self.weights_sha256, device="cuda" if use_gpu else "cpu")

    def check_against_previous(self, model_info: dict[str, Any] | None, parameters: dict[str, Any],
                               unknown: tuple[str, ...] = ()) -> None:
        try:
            check_compatible(self.previous, self.input_root, model_info, parameters, self.output, unknown=unknown)
        except IncompatibleOutputError as exc:
            raise LabelError(str(exc)) from None

    def discard(self) -> None:
        """The run cannot start: remove the output folder if this run made it and it is still empty."""
        if not self.created_output:
            return
        try:
            if self.out_fs.exists(self.out_root) and not self.out_fs.ls(self.out_root, detail=False):
                self.out_fs.rmdir(self.out_root)
        except OSError:
            pass


def preflight(input: str, output: str, opts: LabelOptions) -> Checked:
    """Run the checks of the module docstring; raise LabelError (one sentence) at the first that fails."""
    from diffseg_core.model_check import ModelLoadError, check_model
    from diffseg_core.parameters import anchor_grid_problem, weights_problem
    from diffseg_core.weight_hashes import sha256_files

    try:
        out_fs, out_root = open_fs(output, opts.storage_options)
        root = input_root(input, opts.storage_options)
    except (OSError, ValueError, ImportError) as exc:
        raise LabelError(f"Cannot open {input!r} or {output!r}: {one_line(exc)}") from None
    out_root = out_root.rstrip("/") or out_root

    try:
        model = check_model(opts.model, revision=opts.revision,
                            allow_unsafe_weights=bool(opts.allow_unsafe_weights))
    except ModelLoadError as exc:
        raise LabelError(f"Cannot load model {opts.model!r}: {one_line(exc.what)}") from None
    try:
        image_size = model.image_size(opts.image_size) if model.complete else int(opts.image_size or 0)
    except (ModelLoadError, ValueError) as exc:
        raise LabelError(f"--image-size for model {opts.model!r}: {one_line(exc)}.") from None
    if model.complete:
        problem = anchor_grid_problem(opts.num_points, model.attention_resolutions(image_size), opts.model,
                                      image_size, opts.grouping)
        if problem:
            raise LabelError(f"DiffSeg cannot run on this model: {problem} (--num-points, --image-size).")
        problem = weights_problem(opts.weights, model.attention_resolutions(image_size), opts.model)
        if problem:
            raise LabelError(f"--weights: {problem}.")
    vocab = opts.resolved_vocabulary()
    if vocab is not None:
        try:
            check_against_model(vocab, model)
        except ModelLoadError as exc:
            raise LabelError(f"Cannot load model {opts.model!r}: {one_line(exc.what)}") from None
        except ValueError as exc:
            raise LabelError(f"Vocabulary for model {opts.model!r}: {one_line(exc)}.") from None

    try:
        previous = None if opts.overwrite else recover_manifest(out_fs, out_root)  # a torn one is rebuilt
    except (OSError, ValueError) as exc:
        raise LabelError(f"Cannot read the manifest of {output!r}: {one_line(exc)}") from None
    checked = Checked(input, output, root, out_fs, out_root, model, image_size, None, previous, False)
    device = known_device(opts)
    dtype = opts.dtype or (default_dtype(device == "gpu") if device else None)
    unknown = () if dtype else ("dtype",)
    if model.complete:
        checked.check_against_previous(None, opts.label_parameters(image_size, dtype), unknown)

    if model.weight_files:
        try:
            checked.weights_sha256 = sha256_files(list(model.weight_files))
        except OSError as exc:
            raise LabelError(f"Cannot read the weights of model {opts.model!r}: {one_line(exc)}") from None
    if model.complete:
        info = checked.model_info(opts, dtype or "fp32", device == "gpu")
        checked.check_against_previous(info, opts.label_parameters(image_size, dtype), unknown)

    try:
        first_input(input, opts.storage_options)
    except NoInputError as exc:
        raise LabelError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise LabelError(f"Cannot list input {input!r}: {type(exc).__name__}: {one_line(exc)}") from None

    checked.created_output = _check_writable(out_fs, out_root, output)
    return checked


def _check_writable(fs: Any, root: str, output: str) -> bool:
    """Write and remove a probe file; return whether the output folder had to be made."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if any(c in root for c in "*?[") and "file" not in protocols:
        # s3fs/gcsfs expand such a name as a glob in rm/mv/copy; local folders are handled literally
        raise LabelError(f"Output {output!r}: an object-store folder whose name holds '*', '?' or '[' is read as "
                         "a pattern by its client (fsspec); choose an output name without them.")
    probe = f"{root}/_write_check.{uuid.uuid4().hex[:8]}.tmp"
    try:
        created = not fs.exists(root)
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001
        raise LabelError(f"Output {output!r} is not writable: {one_line(exc)}") from None
    return created

