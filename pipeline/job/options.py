"""``LabelOptions`` (every option of ``diffseg label``) and ``validate_options``, which judges them.

Torch-free and Ray-free: the CLI, the job specs (jobs/spec.py) and the checks before Ray
starts (pipeline/job/preflight.py) read these without importing the run.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from diffseg_core.parameters import ncut_threshold_value
from diffseg_core.vocabulary import DEFAULT_CLASS_THRESHOLD, Vocabulary
from pipeline.data.decode import DEFAULT_MAX_PIXELS
from pipeline.data.parts import Part
from pipeline.errors import LabelError, one_line
from pipeline.job.devices import device_option_problem
from pipeline.job.vocab import read_vocabulary, vocabulary_parameters

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DTYPES = ("fp32", "fp16", "bf16")

__all__ = ["LabelOptions", "validate_options", "DEFAULT_MODEL", "DTYPES"]


@dataclass
class LabelOptions:
    """Every option of ``diffseg label`` (defaults suit one machine, with or without GPUs)."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    actors: int | None = None  # model actors; default: one per GPU, or CPUs - 1 without GPUs
    batch_size: int = 8
    device: str = "auto"  # "gpu": GPUs or stop; "cpu": CPU actors; "auto": GPUs when the cluster has (or will have) them
    gpu_wait_s: float = 600.0  # GPUs asked for and none there yet, but the autoscaler can add them: wait this long
    gpus_per_actor: float | None = None  # default 1 with GPUs, 0 for CPU actors
    cpus_per_actor: float = 1.0  # CPU actors only: CPUs Ray reserves for each
    threads_per_actor: int | None = None  # CPU actors: torch threads; default CPUs / actors (decode is light)
    dtype: str | None = None  # default fp16 on GPU, fp32 on CPU
    vae_dtype: str | None = None  # VAE encoder; default ("auto"): bf16 on GPU, the UNet's dtype on CPU
    image_size: int | None = None  # default: the model's native size (512 for SD 1.x)
    timestep: int = 300
    # None: the model's default (its diffseg.json model card, else the paper's 1.1 / 16 / 3)
    kl_threshold: float | list[float] | None = None
    num_points: int | None = None
    iterations: int | None = None
    refine: bool = False
    weights: list[float] | None = None  # aggregation weights, finest resolution first; None: the model's (else proportional to r)
    boundaries: str | None = None  # "off" or "pamr" (image-guided refinement); None: the model's (else off)
    pamr_iterations: int | None = None  # None: the model's (else the PAMR paper's 10)
    pamr_dilations: list[int] | None = None  # None: the model's (else the PAMR paper's 1, 2, 4, 8, 12, 24)
    min_region_area: int = 0  # regions smaller than this many pixels join the segment around them (0: off)
    connected: bool = False  # every connected region its own segment
    grouping: str = "kl-merge"  # "kl-merge" (the paper's) or "ncut" (recursive normalized cut, diffseg_core.grouping)
    ncut_threshold: float | str = "auto"  # ncut's stopping threshold tau, or "auto" (per image)
    ncut_affinity: str = "attention"  # what ncut cuts: "attention" rows or the encoder's "features"
    rle: bool = False
    rows_per_file: int = 1000
    overwrite: bool = False
    ray_address: str | None = None
    storage_options: dict[str, Any] | None = None
    image_column: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    paper_preprocess: bool = False  # the paper's protocol: centre-crop to a square, label at S x S
    allow_unsafe_weights: bool = False  # load pickle weights (.bin/.ckpt: they can run code)
    max_actors: int | None = None  # autoscaling clusters: the model actor pool grows from `actors` up to this
    actor_resources: dict[str, float] | None = None  # custom Ray resources each model actor needs
    storage_retry_s: float = 120.0  # how long a storage operation retries connection errors, timeouts, 5xx
    retry_errors: list[str] | None = None  # redo committed error rows of these kinds ("read error", ...)
    part: str | None = None  # "i/N": this job labels part i of N that write one output (pipeline/data/parts.py)
    vocabulary: str | list[str] | None = None  # class names ("person,dog" or a list) or a preset: named segments
    vocabulary_file: str | None = None  # or a file of class names, one a line
    class_voting: str = "majority"  # "majority" (official) or "mean"
    class_threshold: float = DEFAULT_CLASS_THRESHOLD  # a segment whose class has less of its pixels is unknown

    def resolved_vocabulary(self) -> Vocabulary | None:
        """The vocabulary of --vocabulary / --vocabulary-file (read once), or None. ValueError if unusable."""
        if not hasattr(self, "_vocabulary"):
            self._vocabulary = read_vocabulary(self.vocabulary, self.vocabulary_file, self.storage_options)
        return self._vocabulary

    def label_parameters(self, image_size: int, dtype: str) -> dict[str, Any]:
        """The options that change a label or the shard plan: they must match on resume."""
        filled = self.with_model_defaults()  # idempotent: what the caller set is kept
        if filled != self:
            return filled.label_parameters(image_size, dtype)
        kl = list(self.kl_threshold) if isinstance(self.kl_threshold, (list, tuple)) else float(self.kl_threshold)
        parameters = {
            "image_size": image_size,
            "dtype": dtype,
            "timestep": self.timestep,
            "kl_threshold": kl,
            "num_points": self.num_points,
            "iterations": len(kl) if isinstance(kl, list) else self.iterations,
            "refine": self.refine,
            "rle": self.rle,
            "rows_per_file": self.rows_per_file,
            "max_pixels": self.max_pixels,
            "image_column": self.image_column,
            "revision": self.revision,
        }
        if self.paper_preprocess:  # only when on: outputs made before the option stay resumable
            parameters["paper_preprocess"] = True
        if self.allow_unsafe_weights:  # likewise
            parameters["allow_unsafe_weights"] = True
        if self.vae_dtype not in (None, "auto"):  # likewise: only when chosen, so auto runs resume
            parameters["vae_dtype"] = self.vae_dtype
        # likewise: only with a vocabulary
        parameters.update(vocabulary_parameters(self.resolved_vocabulary(), self.class_voting, self.class_threshold))
        if self.weights is not None:  # likewise: only when given
            parameters["weights"] = [float(w) for w in self.weights]
        if self.boundaries not in (None, "off"):  # likewise: only when on
            parameters.update(boundaries=self.boundaries, pamr_iterations=self.pamr_iterations,
                              pamr_dilations=[int(d) for d in self.pamr_dilations])
        if self.min_region_area:  # likewise
            parameters["min_region_area"] = self.min_region_area
        if self.connected:  # likewise
            parameters["connected"] = True
        parameters.update(self._grouping_options())  # likewise: only with ncut
        return parameters

    def _grouping_options(self) -> dict[str, Any]:
        """The grouping's options, only when it is not the paper's KL merge (so older outputs resume)."""
        if self.grouping == "kl-merge":
            return {}
        return {"grouping": self.grouping, "ncut_threshold": ncut_threshold_value(self.ncut_threshold),
                "ncut_affinity": self.ncut_affinity}

    def with_model_defaults(self) -> "LabelOptions":
        """The DiffSeg parameters left unset filled in from the model (diffseg_core.method_defaults)."""
        from diffseg_core.method_defaults import with_method_defaults

        given = {"kl_threshold": self.kl_threshold, "num_points": self.num_points, "iterations": self.iterations,
                 "weights": self.weights, "boundaries": self.boundaries, "pamr_iterations": self.pamr_iterations,
                 "pamr_dilations": self.pamr_dilations}
        try:
            return replace(self, **with_method_defaults(self.model, given))
        except OSError as exc:  # a model card that cannot be read
            raise LabelError(f"Cannot load model {self.model!r}: {one_line(exc)}") from None

    def diffseg_kwargs(self) -> dict[str, Any]:
        kl = self.kl_threshold
        weights = {"weights": [float(w) for w in self.weights]} if self.weights is not None else {}
        if self.boundaries not in (None, "off"):
            weights.update(boundaries=self.boundaries, pamr_iterations=self.pamr_iterations,
                           pamr_dilations=list(self.pamr_dilations))
        if self.min_region_area:
            weights["min_region_area"] = self.min_region_area
        if self.connected:
            weights["connected"] = True
        weights.update(self._grouping_options())
        if isinstance(kl, (list, tuple)):
            return {"kl_threshold": list(kl), "num_points": self.num_points, "refine": self.refine, **weights}
        return {"kl_threshold": float(kl), "num_points": self.num_points, "iterations": self.iterations,
                "refine": self.refine, **weights}


def validate_options(opts: LabelOptions) -> None:
    """Raise LabelError (one sentence) for options no run can use; cheap (no torch), before any work.

    The method parameters are judged by diffseg_core.parameters, as DiffSeg's constructor judges them.
    """
    from diffseg_core.parameters import method_thresholds, weights_problem

    opts = opts.with_model_defaults()
    if opts.vae_dtype not in (None, "auto", "fp32", "fp16", "bf16"):
        raise LabelError(f"--vae-dtype must be auto, fp32, fp16 or bf16, not {opts.vae_dtype!r}.")
    try:
        vocab = opts.resolved_vocabulary()
        vocabulary_parameters(vocab, opts.class_voting, opts.class_threshold)
    except ValueError as exc:
        raise LabelError(f"Vocabulary: {one_line(exc)}.") from None
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise LabelError(f"--dtype must be one of {', '.join(DTYPES)}, not {opts.dtype!r}.")
    for name in ("batch_size", "rows_per_file", "num_points", "iterations", "max_pixels"):
        _positive_int(name, getattr(opts, name))
    for name in ("actors", "image_size", "threads_per_actor"):
        if getattr(opts, name) is not None:
            _positive_int(name, getattr(opts, name))
    if isinstance(opts.timestep, bool) or not isinstance(opts.timestep, int) or opts.timestep < 0:
        raise LabelError(f"--timestep must be an integer >= 0, not {opts.timestep!r}.")
    if isinstance(opts.cpus_per_actor, bool) or not isinstance(opts.cpus_per_actor, (int, float)) \
            or not opts.cpus_per_actor > 0:
        raise LabelError(f"--cpus-per-actor must be a number > 0, not {opts.cpus_per_actor!r}.")
    if opts.max_actors is not None and (
        isinstance(opts.max_actors, bool) or not isinstance(opts.max_actors, int) or opts.max_actors < (opts.actors or 1)
    ):
        raise LabelError(f"--max-actors must be an integer no smaller than --actors, not {opts.max_actors!r}.")
    if opts.actor_resources is not None and (
        not isinstance(opts.actor_resources, dict)
        or not all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in opts.actor_resources.items())
    ):
        raise LabelError("--actor-resources must map resource names to positive amounts, e.g. '{\"labeler\": 1}'.")
    if isinstance(opts.storage_retry_s, bool) or not isinstance(opts.storage_retry_s, (int, float)) \
            or opts.storage_retry_s < 0:
        raise LabelError(f"--storage-retry-s must be a number of seconds >= 0, not {opts.storage_retry_s!r}.")
    if opts.retry_errors is not None and (
        isinstance(opts.retry_errors, str) or not all(isinstance(k, str) and k.strip() for k in opts.retry_errors)
    ):
        raise LabelError(f"--retry-errors takes error kinds such as 'read error', not {opts.retry_errors!r}.")
    try:
        part = Part.parse(opts.part)
    except ValueError as exc:
        raise LabelError(f"{exc}.") from None
    if part.partitioned and opts.overwrite:
        raise LabelError("--overwrite cannot be used with --part: parts run at once, and one would delete the "
                         "others' labels; delete the output's files first, or label into a new output.")
    problem = device_option_problem(opts.device, opts.gpus_per_actor, opts.gpu_wait_s)
    if problem:
        raise LabelError(problem)
    problem = weights_problem(opts.weights)
    if problem:
        raise LabelError(f"--weights: {problem}.")
    from diffseg_core.parameters import boundaries_problem, grouping_problem
    from diffseg_core.regions import cleaning_problem

    problem = (grouping_problem(opts.grouping, opts.ncut_threshold, opts.ncut_affinity)
               or boundaries_problem(opts.boundaries if opts.boundaries is not None else "off",
                                  opts.pamr_iterations if opts.pamr_iterations is not None else 10,
                                  opts.pamr_dilations if opts.pamr_dilations is not None else [1])
               or cleaning_problem(opts.min_region_area, opts.connected))
    if problem:
        name, rest = problem.split(" ", 1)  # "min_region_area must be ..." -> "--min-region-area must be ..."
        raise LabelError(f"--{name.replace('_', '-')} {rest}.")
    try:
        kwargs = opts.diffseg_kwargs()
        method_thresholds(kwargs["kl_threshold"], kwargs["num_points"], kwargs.get("iterations"))
    except (ValueError, TypeError) as exc:
        raise LabelError(f"DiffSeg parameters: {exc}.") from None


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LabelError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}.")
