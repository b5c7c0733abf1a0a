"""``label()``: the whole job, from an input URL to a committed Parquet dataset.

Order of work, cheapest and most likely to fail first (no model work happens
until the input is listed, the output is writable and the model has loaded):

  1. list the input (one find/glob);           -> "no input matched"
  2. check the output is writable;            -> "output not writable"
  3. load the model once in the driver (CPU)  -> "cannot load model"
     for its provenance, compare with the manifest -> "different settings"
  4. plan shards, drop what a killed run left, skip committed shards;
  5. Ray Data: shards -> read+decode (CPU tasks) -> LabelActor pool
     -> encode (CPU tasks) -> ShardSink in the driver.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.credentials import refuse_url_credentials
from pipeline.dataset_card import write_dataset_card
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.manifest import (
    IncompatibleOutputError,
    check_compatible,
    new_manifest,
    read_manifest,
    write_manifest,
)
from pipeline.resume import clean_uncommitted, done_shards, load_or_make_plan, read_markers
from pipeline.schema import DONE_DIR, MANIFEST, PLAN, STAGE_NAMES, TMP_DIR, shard_of_part
from pipeline.sink import ShardSink, write_marker
from pipeline.sources import NoInputError, list_inputs, open_fs

logger = logging.getLogger(__name__)
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


class LabelError(RuntimeError):
    """A systemic failure: the run cannot start or cannot finish. The message is one sentence."""


@dataclass
class LabelOptions:
    """Every option of ``diffseg label`` (defaults suit one machine, with or without GPUs)."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    actors: int | None = None  # model actors; default: one per GPU, or CPUs - 1 without GPUs
    batch_size: int = 8
    gpus_per_actor: float | None = None  # default 1 when the cluster has GPUs, else 0 (CPU actors)
    cpus_per_actor: float = 1.0  # CPU actors only: CPUs Ray reserves for each
    threads_per_actor: int | None = None  # CPU actors: torch threads; default CPUs / actors (decode is light)
    dtype: str | None = None  # default fp16 on GPU, fp32 on CPU
    vae_dtype: str | None = None  # VAE encoder; default ("auto"): bf16 on GPU, the UNet's dtype on CPU
    image_size: int | None = None  # default: the model's native size (512 for SD 1.x)
    timestep: int = 300
    kl_threshold: float | list[float] = 1.1
    num_points: int = 16
    iterations: int = 3
    refine: bool = False
    rle: bool = False
    rows_per_file: int = 1000
    overwrite: bool = False
    ray_address: str | None = None
    storage_options: dict[str, Any] | None = None
    image_column: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    paper_preprocess: bool = False  # the paper's protocol: centre-crop to a square, label at S x S
    allow_unsafe_weights: bool = False  # load pickle weights (.bin/.ckpt: they can run code)

    def label_parameters(self, image_size: int, dtype: str) -> dict[str, Any]:
        """The options that change a label or the shard plan: they must match on resume."""
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
        return parameters

    def diffseg_kwargs(self) -> dict[str, Any]:
        kl = self.kl_threshold
        if isinstance(kl, (list, tuple)):
            return {"kl_threshold": list(kl), "num_points": self.num_points, "refine": self.refine}
        return {"kl_threshold": float(kl), "num_points": self.num_points, "iterations": self.iterations,
                "refine": self.refine}


def label(input: str, output: str, **options: Any) -> dict[str, Any]:
    """Label every image under ``input``; write Parquet pseudo-labels under ``output``.

    Options: the fields of LabelOptions. Returns the run summary (see ``summarize``).
    Raises LabelError (one clear sentence) on systemic failures.
    """
    opts = LabelOptions(**options)
    validate_options(opts)
    try:
        refuse_url_credentials(input, output, opts.storage_options)  # they would reach the manifest and logs
    except ValueError as exc:
        raise LabelError(str(exc)) from None
    started = time.time()
    times: dict[str, float] = {}

    t = time.perf_counter()
    try:
        listing = list_inputs(input, opts.storage_options)
    except NoInputError as exc:
        raise LabelError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise LabelError(f"Cannot list input {input!r}: {type(exc).__name__}: {exc}") from None
    times["list"] = time.perf_counter() - t

    out_fs, out_root = open_fs(output, opts.storage_options)
    out_root = out_root.rstrip("/") or out_root
    _check_writable(out_fs, out_root, output)

    ray = _init_ray(opts.ray_address)
    resources = ray.cluster_resources()
    use_gpu, gpus_per_actor = _gpu_plan(opts, resources)
    dtype = opts.dtype or ("fp16" if use_gpu else "fp32")

    t = time.perf_counter()
    model_info = probe_model(opts, dtype)
    times["model check"] = time.perf_counter() - t
    image_size = int(model_info["image_size"])
    parameters = opts.label_parameters(image_size, dtype)
    if opts.overwrite:  # only now: a run that cannot even load its model must not delete labels
        _remove_previous_output(out_fs, out_root)
    previous = read_manifest(out_fs, out_root)
    try:
        check_compatible(previous, listing.root, model_info, parameters, output)
    except IncompatibleOutputError as exc:
        raise LabelError(str(exc)) from None
    manifest = new_manifest(listing.root, output, model_info, parameters, previous)
    write_manifest(out_fs, out_root, manifest)

    t = time.perf_counter()
    shards, new_shards = load_or_make_plan(out_fs, out_root, listing, opts.rows_per_file)
    done = done_shards(out_fs, out_root)
    removed = clean_uncommitted(out_fs, out_root, done)
    todo = [s for s in shards if s.shard_id not in done]
    times["plan"] = time.perf_counter() - t
    if removed:
        logger.warning("removed %d uncommitted file(s) left by an earlier run", len(removed))

    metadata = {"model": manifest["model"], "parameters": parameters, "version": manifest["version"],
                "input": listing.root}
    sink = ShardSink(out_fs, out_root, opts.rows_per_file, metadata)
    t = time.perf_counter()
    if todo:
        dataset = build_dataset(
            ray, todo, listing.root, opts, image_size=image_size, dtype=dtype, use_gpu=use_gpu,
            gpus_per_actor=gpus_per_actor, resources=resources,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            sink.add(batch)
        # The stream finished, so every task ran: shards that sent no row are empty inputs.
        seen = set(sink.committed) | set(sink.open)
        for shard in todo:
            if shard.shard_id not in seen:
                write_marker(out_fs, out_root, shard.shard_id,
                             {"shard_id": shard.shard_id, "rows": 0, "errors": {}, "files": [],
                              "committed_at": time.time()})
                sink.committed.append(shard.shard_id)
    times["pipeline"] = time.perf_counter() - t
    gc.collect()

    markers = read_markers(out_fs, out_root)
    summary = summarize(opts, input, output, listing.root, manifest, markers, sink, shards, len(done),
                        new_shards, times, started)
    manifest["status"] = "complete" if summary["complete"] else "incomplete"
    manifest["counts"] = {k: summary[k] for k in ("images", "labelled", "errors", "errors_by_kind", "shards")}
    manifest["runs"].append({
        "started_at": started,
        "finished_at": time.time(),
        "options": _run_options(opts, use_gpu, gpus_per_actor),
        "this_run": summary["this_run"],
        "seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
        "stage_seconds": summary["stage_seconds"],
    })
    write_manifest(out_fs, out_root, manifest)
    write_dataset_card(out_fs, out_root, manifest)  # load_dataset(OUTPUT) reads the labels
    if sink.open:
        raise LabelError(
            f"{len(sink.open)} shard(s) did not receive all their rows and were not committed "
            f"(first: {sorted(sink.incomplete().items())[:3]}); rerun the same command to finish them."
        )
    return summary


def build_dataset(
    ray: Any,
    shards: list,
    root: str,
    opts: LabelOptions,
    *,
    image_size: int,
    dtype: str,
    use_gpu: bool,
    gpus_per_actor: float,
    resources: dict[str, float],
):
    """The Ray Data plan (lazy): shards -> decoded rows -> labels -> output rows."""
    from pipeline.actors import GPU_ACTOR_CPUS, LabelActor, pool_strategy
    from pipeline.tasks import encode_rows, read_decode

    cpus = float(resources.get("CPU", 1))
    actors = opts.actors or _default_actors(opts, use_gpu, gpus_per_actor, resources)
    actor_cpus = float(GPU_ACTOR_CPUS) if use_gpu else float(opts.cpus_per_actor)
    left = cpus - actors * actor_cpus
    if left < 0.25:
        raise LabelError(
            f"{actors} model actor(s) x {actor_cpus:g} CPU"
            + f" leave no CPU for reading and encoding on a cluster of {cpus:g} CPUs; lower --actors."
        )
    task_cpus = min(1.0, left)

    items = [s.to_json() for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        read_decode,
        batch_size=1,
        batch_format="numpy",
        num_cpus=task_cpus,
        # A real request (a chunk of raw bytes + decoded pixels, twice over). It also keeps
        # decoding out of the model actor: Ray fuses a task map into the next actor map
        # only when their remote args are identical.
        memory=_decode_memory(image_size),
        fn_kwargs={
            "root": root,
            "image_size": image_size,
            "storage_options": opts.storage_options,
            "image_column": opts.image_column,
            "max_pixels": opts.max_pixels,
            "paper_preprocess": bool(opts.paper_preprocess),
        },
    )
    ds = ds.map_batches(
        LabelActor,
        batch_size=int(opts.batch_size),
        batch_format="numpy",
        # Two calls at a time per actor: one's host work overlaps the other's device work.
        compute=pool_strategy(actors),
        num_gpus=gpus_per_actor if use_gpu else None,
        num_cpus=actor_cpus,
        fn_constructor_kwargs={
            "model": opts.model,
            "device": "cuda" if use_gpu else "cpu",
            "dtype": dtype,
            "vae_dtype": opts.vae_dtype,
            "image_size": image_size,
            "timestep": opts.timestep,
            "revision": opts.revision,
            "diffseg_kwargs": opts.diffseg_kwargs(),
            # GPU actors: as many torch threads as the CPUs Ray reserved for them (not every core of the node)
            "threads": GPU_ACTOR_CPUS if use_gpu else (opts.threads_per_actor or max(1, int(cpus // actors))),
            "allow_unsafe_weights": bool(opts.allow_unsafe_weights),
        },
    )
    ds = ds.map_batches(encode_rows, batch_size=64, batch_format="numpy", num_cpus=task_cpus,
                        fn_kwargs={"rle": opts.rle})
    return ds


def probe_model(opts: LabelOptions, dtype: str) -> dict[str, Any]:
    """Load the model once, on CPU in the driver: fails fast, and gives its provenance."""
    from diffseg_core.extract import AttentionExtractor
    from diffseg_core.labeler import anchor_grid_problem

    try:
        extractor = AttentionExtractor.from_pretrained(
            opts.model, device="cpu", dtype=dtype, image_size=opts.image_size, timestep=opts.timestep,
            revision=opts.revision, allow_unsafe_weights=bool(opts.allow_unsafe_weights),
        )
        info = extractor.model_info
    except Exception as exc:  # noqa: BLE001 - ModelLoadError, bad dtype/size, missing files, ...
        raise LabelError(f"Cannot load model {opts.model!r}: {_one_line(exc)}") from None
    problem = anchor_grid_problem(opts.num_points, extractor.attention_resolutions, opts.model, extractor.image_size)
    if problem:
        raise LabelError(f"DiffSeg cannot run on this model: {problem} (--num-points, --image-size).")
    del extractor
    gc.collect()
    return info


def summarize(
    opts: LabelOptions, input: str, output: str, root: str, manifest: dict, markers: list[dict], sink: ShardSink,
    shards: list, skipped: int, new_shards: int, times: dict[str, float], started: float,
) -> dict[str, Any]:
    """Counts over the whole output (all runs) and this run's throughput and stage times."""
    errors_by_kind: Counter = Counter()
    for m in markers:
        errors_by_kind.update(m.get("errors", {}))
    images = sum(m.get("rows", 0) for m in markers)
    errors = sum(errors_by_kind.values())
    run_errors = sum(sink.errors.values())
    pipeline_s = times.get("pipeline", 0.0)
    stage = {name: round(v, 3) for name, v in times.items()}
    for col, name in STAGE_NAMES.items():
        if sink.stage_seconds.get(col):
            stage[f"{name} (worker s)"] = round(sink.stage_seconds[col], 3)
    stage["write (driver s)"] = round(sink.write_seconds, 3)
    return {
        "input": input,
        "output": output,
        "model": manifest["model"].get("model"),
        "images": images,
        "labelled": images - errors,
        "errors": errors,
        "errors_by_kind": dict(sorted(errors_by_kind.items())),
        "shards": {"total": len(shards), "done": len(markers), "skipped_already_done": skipped,
                   "written_this_run": len(sink.committed), "new_in_plan": new_shards},
        "this_run": {"images": sink.rows, "labelled": sink.rows - run_errors,
                     "errors_by_kind": dict(sorted(sink.errors.items())), "duplicates_dropped": sink.duplicates},
        "complete": len(markers) == len(shards) and not sink.open,
        "seconds": round(time.time() - started, 3),
        "images_per_s": round(sink.rows / pipeline_s, 3) if pipeline_s > 0 else 0.0,
        "steady_images_per_s": round(sink.steady_rate(), 3),
        "stage_seconds": stage,
    }


# ---------------------------------------------------------------------------- helpers


def validate_options(opts: LabelOptions) -> None:
    """Raise LabelError (one sentence) for options no run can use; cheap, before any work.

    DiffSeg's own constructor judges the method parameters, so the bounds live in one place.
    """
    from diffseg_core.segmentor import DiffSeg

    if opts.vae_dtype not in (None, "auto", "fp32", "fp16", "bf16"):
        raise LabelError(f"--vae-dtype must be auto, fp32, fp16 or bf16, not {opts.vae_dtype!r}.")
    for name in ("batch_size", "rows_per_file", "num_points", "iterations"):
        value = getattr(opts, name)
        if not isinstance(value, int) or value < 1:
            raise LabelError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}.")
    if opts.actors is not None and opts.actors < 1:
        raise LabelError(f"--actors must be a positive integer, not {opts.actors!r}.")
    try:
        DiffSeg(**opts.diffseg_kwargs())
    except ValueError as exc:
        raise LabelError(f"DiffSeg parameters: {exc}.") from None


def _check_writable(fs: Any, root: str, output: str) -> None:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if any(c in root for c in "*?[") and "file" not in protocols:
        # s3fs/gcsfs expand such a name as a glob in rm/mv/copy; local folders are handled literally
        raise LabelError(f"Output {output!r}: an object-store folder whose name holds '*', '?' or '[' is read as "
                         "a pattern by its client (fsspec); choose an output name without them.")
    probe = f"{root}/_write_check.tmp"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001
        raise LabelError(f"Output {output!r} is not writable: {_one_line(exc)}") from None


def _remove_previous_output(fs: Any, root: str) -> None:
    """--overwrite: delete only what this tool writes (never other files in the folder)."""
    for name in (MANIFEST, PLAN, DONE_DIR, TMP_DIR):
        path = f"{root}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=True)
    for p in fs.ls(root, detail=False):
        if shard_of_part(p) is not None:
            fs.rm(p)


def _init_ray(address: str | None):
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    return ray


def _gpu_plan(opts: LabelOptions, resources: dict[str, float]) -> tuple[bool, float]:
    gpus = float(resources.get("GPU", 0))
    per_actor = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if per_actor > 0 and gpus == 0:
        raise LabelError(f"--gpus-per-actor {per_actor:g} asks for GPUs, but the Ray cluster has none.")
    return per_actor > 0, per_actor


def _default_actors(opts: LabelOptions, use_gpu: bool, gpus_per_actor: float, resources: dict[str, float]) -> int:
    if use_gpu:
        return max(1, int(math.floor(float(resources.get("GPU", 0)) / gpus_per_actor)))
    cpus = float(resources.get("CPU", 1))
    return max(1, int((cpus - 1.0) // opts.cpus_per_actor))


def _decode_memory(image_size: int) -> int:
    from pipeline.tasks import DECODE_CHUNK

    return 64 * 2**20 + 2 * DECODE_CHUNK * image_size * image_size * 3


def _run_options(opts: LabelOptions, use_gpu: bool, gpus_per_actor: float) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("storage_options", None)  # may hold credentials
    d.update(use_gpu=use_gpu, gpus_per_actor=gpus_per_actor)
    return d


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."
