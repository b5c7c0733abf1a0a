"""``label()``: the whole job, from an input URL to a committed Parquet dataset.

Order of work, cheapest and most likely to fail first:

  1. options, model (configs and file headers, no weights), the output's manifest,
     the input's first file, a writable output: all before Ray starts
     (pipeline/job/preflight.py), so a wrong path fails in a second;
  2. ``ray.init``; GPUs or CPUs (pipeline/job/devices.py), hence the default dtype;
     the manifest check of what depends on it; the manifest written ("running");
  3. the input listed and the shard plan extended, both streamed (sources, resume);
     what a killed run left is dropped, committed shards are skipped;
  4. Ray Data: shards -> read+decode (CPU tasks) -> LabelActor pool
     -> encode + write (CPU tasks: spill parts on the workers) -> part records
     -> the Committer in the driver (a finalize task per shard, its marker);
  5. the manifest: "complete", "incomplete" or, after Ctrl-C / SIGTERM, "interrupted".

The driver never loads the model (a small head node is enough); the model actors do.
Nor does it see a label row: the workers write them. It holds the output's lease (one
writer per output) from the checks to the end.
"""
from __future__ import annotations

import errno
import gc
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

from diffseg_core.vocabulary import DEFAULT_CLASS_THRESHOLD, Vocabulary
from pipeline.data.credentials import refuse_url_credentials
from pipeline.data.decode import DEFAULT_MAX_PIXELS
from pipeline.data.manifest import new_manifest, write_manifest, write_merged_manifest
from pipeline.data.parts import Part, part_of_file
from pipeline.data.resume import (
    clean_uncommitted,
    drop_markers,
    read_markers,
    shards_by_id,
    update_plan_rebuilding,
)
from pipeline.data.retry import RetryPolicy, describe, is_transient, storage_refusal
from pipeline.data.storage import TornFileError, read_json
from pipeline.data.schema import (
    DONE_DIR,
    MANIFEST,
    PLAN,
    STAGE_NAMES,
    STAGED_DIR,
    TMP_DIR,
    shard_of_part,
)
from pipeline.data.containers import plan_inputs
from pipeline.data.sources import SkippedInputs, output_in_input
from pipeline.errors import LabelError
from pipeline.ray_connect import init_ray
from pipeline.job import lease
from pipeline.job.block_stats import bound_block_stats
from pipeline.job.commit import CommitError, Committer
from pipeline.job.dataset_card import write_dataset_card
from pipeline.job.devices import DevicePlan, device_option_problem, plan_devices
from pipeline.job.interrupt import RunInterrupted, stop_signals
from pipeline.job.partition import check_layout
from pipeline.job.preflight import Checked, default_dtype, preflight
from pipeline.job.redo import retry_item, rows_to_retry
from pipeline.job.sink import OutputLocation
from pipeline.job.vocab import read_vocabulary, vocabulary_parameters

logger = logging.getLogger(__name__)
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DTYPES = ("fp32", "fp16", "bf16")
READ_CPUS = 0.25  # a plan-shard read task (see shard_dataset)
ENCODE_BATCH_ROWS = 64  # rows per encode + write task, at most (see build_dataset)
OUTPUT_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)})

__all__ = ["label", "LabelError", "LabelOptions", "validate_options", "DEFAULT_MODEL"]


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
        return parameters

    def with_model_defaults(self) -> "LabelOptions":
        """The DiffSeg parameters left unset filled in from the model (diffseg_core.method_defaults)."""
        from diffseg_core.method_defaults import with_method_defaults

        given = {"kl_threshold": self.kl_threshold, "num_points": self.num_points, "iterations": self.iterations,
                 "weights": self.weights, "boundaries": self.boundaries, "pamr_iterations": self.pamr_iterations,
                 "pamr_dilations": self.pamr_dilations}
        try:
            return replace(self, **with_method_defaults(self.model, given))
        except OSError as exc:  # a model card that cannot be read
            raise LabelError(f"Cannot load model {self.model!r}: {_one_line(exc)}") from None

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
        if isinstance(kl, (list, tuple)):
            return {"kl_threshold": list(kl), "num_points": self.num_points, "refine": self.refine, **weights}
        return {"kl_threshold": float(kl), "num_points": self.num_points, "iterations": self.iterations,
                "refine": self.refine, **weights}


def label(input: str, output: str, **options: Any) -> dict[str, Any]:
    """Label every image under ``input``; write Parquet pseudo-labels under ``output``.

    Options: the fields of LabelOptions. Returns the run summary (see ``summarize``).
    Raises LabelError (one clear sentence) on systemic failures, and RunInterrupted
    (a KeyboardInterrupt) after SIGINT or SIGTERM, once the manifest says "interrupted".
    """
    try:
        refuse_url_credentials(input, output, options.get("storage_options"))  # they would reach the manifest and logs
    except ValueError as exc:
        raise LabelError(str(exc)) from None
    problem = output_in_input(input, output, options.get("storage_options"))  # its labels would be read as images
    if problem:
        raise LabelError(problem)
    opts = LabelOptions(**options).with_model_defaults()
    validate_options(opts)
    started = time.time()
    times: dict[str, float] = {}
    with stop_signals() as stop:
        t = time.perf_counter()
        checked = preflight(input, output, opts)
        times["checks"] = time.perf_counter() - t
        part = Part.parse(opts.part)
        try:  # one output (or part), one writer: before Ray starts, so a second run is refused in a second
            held = lease.acquire(checked.out_fs, checked.out_root,
                                 f"part {part} of {output}" if part.partitioned else output, name=part.lease_name)
        except lease.LeaseHeldError as exc:
            raise LabelError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a full, read-only or unreachable output
            if isinstance(exc, OSError) or is_transient(exc):
                raise LabelError(_storage_sentence(output, exc)) from None
            raise
        held.start_heartbeat()
        try:  # after our lease: of two runs of different layouts started together, one sees the other
            check_layout(checked.out_fs, checked.out_root, part, output, checked.previous, opts.overwrite)
        except LabelError:
            held.release()
            checked.discard()
            raise
        ray, own_ray = None, False
        try:
            t = time.perf_counter()
            ray, own_ray = _init_ray(opts.ray_address)
            stop.install()  # ray.init put its own SIGTERM handler in place
            times["ray start"] = time.perf_counter() - t
            devices = plan_devices(ray, opts.device, opts.gpus_per_actor, opts.gpu_wait_s)
            dtype = opts.dtype or default_dtype(devices.use_gpu)
            model_info, image_size = _model_info(ray, checked, opts, dtype, devices)
            parameters = opts.label_parameters(image_size, dtype)
            checked.check_against_previous(model_info, parameters)
        except (LabelError, RunInterrupted):
            held.release()
            checked.discard()
            _shutdown(ray, own_ray)
            raise
        try:
            return _run(ray, stop, checked, opts, devices, dtype, image_size, model_info, parameters, times,
                        started, held)
        except CommitError as exc:
            raise LabelError(str(exc)) from None
        except (LabelError, RunInterrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - the output's bookkeeping could not be read or written
            if isinstance(exc, OSError) or is_transient(exc):
                raise LabelError(_storage_sentence(output, exc)) from None
            raise
        finally:
            _shutdown(ray, own_ray)
            if stop.received is not None:  # a clean stop leaves only what it committed
                _tidy_after_stop(checked.out_fs, checked.out_root, part)
            held.release()


def _run(ray: Any, stop: Any, checked: Checked, opts: "LabelOptions", devices: DevicePlan, dtype: str,
         image_size: int, model_info: dict[str, Any], parameters: dict[str, Any], times: dict[str, float],
         started: float, held: Any = None) -> dict[str, Any]:
    """From a checked, compatible output to a committed one (the part that writes)."""
    out_fs, out_root, output = checked.out_fs, checked.out_root, checked.output
    part = Part.parse(opts.part)
    if opts.overwrite:  # only now: a run that cannot even start must not delete labels
        _remove_previous_output(out_fs, out_root)
    policy = RetryPolicy(deadline_s=float(opts.storage_retry_s))
    previous = _own_manifest(out_fs, out_root, part) if part.partitioned else checked.previous
    manifest = new_manifest(checked.input_root, output, model_info, parameters, previous)
    if part.partitioned:
        manifest["part"] = str(part)
    vocab = opts.resolved_vocabulary()
    if vocab is not None:  # the names and their hash; the hash is a label parameter too
        manifest["vocabulary"] = vocab.to_json()
    _write_manifests(out_fs, out_root, manifest, part, policy)  # first: load_dataset(OUTPUT) works at every moment

    t = time.perf_counter()
    markers, torn = _own_markers(out_fs, out_root, part, policy)
    skipped = SkippedInputs()  # FIFOs, sockets, devices with an input's name: never opened
    try:
        plan, dropped = update_plan_rebuilding(
            out_fs, out_root,
            lambda: plan_inputs(checked.input, opts.storage_options, opts.rows_per_file, out_fs, out_root, skipped,
                                part, checked.input_root),
            opts.rows_per_file, markers, part)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in OUTPUT_FULL_ERRNOS:  # writing the plan, not listing
            raise LabelError(_storage_sentence(output, exc)) from None
        raise LabelError(f"Cannot list input {checked.input!r}: {type(exc).__name__}: {_one_line(exc)}") from None
    done = set(markers)
    metadata = {"model": manifest["model"], "parameters": parameters, "version": manifest["version"],
                "input": checked.input_root}
    if vocab is not None:
        metadata["vocabulary"] = manifest["vocabulary"]
    from pipeline.job.provenance import ProvenanceCheck, expected

    check = ProvenanceCheck(expected(opts, image_size=image_size, dtype=dtype, model_info=model_info))
    committer = Committer(out_fs, out_root, OutputLocation(output, opts.storage_options), opts.rows_per_file,
                          metadata, policy, provenance=check)
    interrupted: RunInterrupted | None = None
    try:  # from here on the plan is known: a stop says how many of its shards are committed
        if dropped:
            logger.warning("the shard plan was rebuilt: %d committed shard(s) no longer match it and are redone",
                           len(dropped))
            drop_markers(out_fs, out_root, markers, dropped)
            done = set(markers)
        removed = clean_uncommitted(out_fs, out_root, markers, torn, part=part)
        retry_rows = rows_to_retry(out_fs, out_root, markers, opts.retry_errors) if opts.retry_errors else {}
        times["list+plan"] = time.perf_counter() - t
        if removed:
            logger.warning("removed %d uncommitted file(s) left by an earlier run", len(removed))
        t = time.perf_counter()
        shards_ds, todo = shard_dataset(ray, out_fs, out_root, plan.index, opts.storage_options, done,
                                        part.plan_name)
        for shard_id in todo:
            committer.expect(shard_id)
        if retry_rows:  # --retry-errors: the rows to redo, as work items of their own
            plan_shards = shards_by_id(out_fs, out_root, retry_rows, part.plan_name)
            items = [retry_item(plan_shards[sid], rows) for sid, rows in sorted(retry_rows.items())]
            for sid, rows in retry_rows.items():
                committer.expect(sid, replace={"marker": markers[sid], "drop": [i for i, _ in rows]})
            retry_ds = ray.data.from_items(items, override_num_blocks=len(items))
            shards_ds = retry_ds if shards_ds is None else shards_ds.union(retry_ds)
        if shards_ds is not None:
            bound_block_stats()  # else Ray Data keeps a stats object per block in the driver until the end
            dataset = build_dataset(
                ray, shards_ds, checked.input_root, opts, image_size=image_size, dtype=dtype,
                use_gpu=devices.use_gpu, gpus_per_actor=devices.gpus_per_actor, resources=ray.cluster_resources(),
                committer=committer,
            )
            drive(dataset, committer, held)
    except RunInterrupted as exc:
        interrupted = exc  # open shards are dropped: uncommitted, a rerun redoes them
    times["pipeline"] = time.perf_counter() - t

    with stop.deferred():
        gc.collect()
        final_markers, _ = _own_markers(out_fs, out_root, part, policy)
        markers = list(final_markers.values())
        summary = summarize(opts, checked.input, output, checked.input_root, manifest, markers, committer,
                            plan.shards, len(done), plan.new, times, started)
        if part.partitioned:
            summary["part"] = str(part)
        if skipped.count:
            summary["skipped_inputs"] = skipped.to_json()
            logger.warning("%s", skipped.sentence())
        if interrupted is not None and not summary["complete"]:
            manifest["status"] = "interrupted"
        else:
            manifest["status"] = "complete" if summary["complete"] else "incomplete"
        manifest["counts"] = {k: summary[k] for k in ("images", "labelled", "errors", "errors_by_kind", "shards")}
        manifest["runs"].append({
            "started_at": started,
            "finished_at": time.time(),
            "status": manifest["status"],
            "options": _run_options(opts, devices),
            "this_run": summary["this_run"],
            "seconds": summary["seconds"],
            "images_per_s": summary["images_per_s"],
            "stage_seconds": summary["stage_seconds"],
        })
        merged = _write_manifests(out_fs, out_root, manifest, part, policy)  # load_dataset(OUTPUT) reads the labels
        if part.partitioned:
            summary["parts"] = merged.get("parts", {}) if merged else {}
    if interrupted is not None:
        interrupted.committed, interrupted.total = len(markers), plan.shards
        raise interrupted
    if committer.failed:
        first_id, why = sorted(committer.failed.items())[0]
        raise LabelError(
            f"{len(committer.failed)} shard(s) were left uncommitted because storage stayed unreachable after "
            f"retrying for {policy.deadline_s:g} s (first: shard {first_id}: {why}); rerun the same command "
            "when it is reachable to finish them."
        )
    if committer.incomplete():
        raise LabelError(
            f"{len(committer.incomplete())} shard(s) did not receive all their rows and were not committed "
            f"(first: {sorted(committer.incomplete().items())[:3]}); rerun the same command to finish them."
        )
    return summary


def drive(dataset: Any, committer: Committer, held: Any = None) -> None:
    """The driver loop: consume the part records the writers send and commit shards as they complete.

    Only records reach this process (no label bytes). Stops the run (CommitError,
    LabelError) when the output refuses writes or another run took the lease.
    """
    import ray

    from pipeline.job.free_memory import MemoryReleaser
    from pipeline.job.progress import show_progress

    cpu = time.process_time()
    releaser = MemoryReleaser()  # the allocators' freed pages back to the system every few seconds
    try:
        for records in show_progress(dataset, committer, batch_size=None, batch_format="pyarrow"):
            committer.add(records)
            releaser.tick()
            if held is not None and held.lost:
                raise LabelError(f"Another run took over the lease of {committer.output.url!r}; this run stopped.")
    except ray.exceptions.RayTaskError:
        raise  # an exception in our own code: a bug, shown as such
    except ray.exceptions.RayError as exc:  # workers, objects or nodes lost past Ray's retries
        raise LabelError(
            f"The Ray cluster lost work it could not recover ({describe(exc)}); committed shards are kept: "
            "rerun the same command to finish."
        ) from None
    committer.finish()
    committer.pipeline_cpu = time.process_time() - cpu
    committer.memory_releases = releaser.releases


def shard_dataset(ray: Any, out_fs: Any, out_root: str, index: Any, storage_options: dict[str, Any] | None,
                  done: set[int], plan_name: str = PLAN) -> tuple[Any, list[int]]:
    """The plan's shards not yet done, as a Ray dataset of one-row blocks (shard_id, kind, paths).

    Read by Ray tasks from the plan file (pipeline/job/shard_source.py): the driver keeps the
    plan's index (24 bytes per shard), never a list of paths.
    """
    from pipeline.job.shard_source import PlanShards

    todo = index.without(done)
    if not len(todo):
        return None, []
    source = PlanShards(out_fs.unstrip_protocol(f"{out_root}/{plan_name}"), todo, storage_options)
    # A read is one small gzip member: a quarter CPU, so it fits beside model actors that take
    # all but 0.25 CPU of a small cluster (build_dataset leaves at least that much).
    return (ray.data.read_datasource(source, override_num_blocks=len(todo), num_cpus=READ_CPUS),
            todo.shard_ids.tolist())


def build_dataset(
    ray: Any,
    shards: Any,
    root: str,
    opts: LabelOptions,
    *,
    image_size: int,
    dtype: str,
    use_gpu: bool,
    gpus_per_actor: float,
    resources: dict[str, float],
    committer: Committer,
):
    """The Ray Data plan (lazy): shards (a dataset, see shard_dataset) -> decoded rows -> labels ->
    output rows -> spill parts written by the workers -> part records (all the driver reads)."""
    from pipeline.job.actors import GPU_ACTOR_CPUS, LabelActor, pool_strategy
    from pipeline.job.sink import write_rows
    from pipeline.job.tasks import DECODE_CHUNK, encode_rows, read_decode

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

    ds = shards.map_batches(
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
            "retry": committer.policy,
            "chunk": DECODE_CHUNK,  # read here, when the plan is built: tests set a small one
        },
    )
    # A model actor that dies (its process killed, its node lost) is restarted and its
    # batches retried: Ray Data's defaults for actor pools (max_restarts=-1,
    # max_task_retries=-1), kept as they are. --max-actors makes the pool autoscale.
    ds = ds.map_batches(
        LabelActor,
        batch_size=int(opts.batch_size),
        batch_format="numpy",
        # Two calls at a time per actor: one's host work overlaps the other's device work.
        compute=pool_strategy(actors, opts.max_actors),
        num_gpus=gpus_per_actor if use_gpu else None,
        num_cpus=actor_cpus,
        resources=opts.actor_resources or None,
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
            **_class_kwargs(opts),
        },
    )
    vocab = opts.resolved_vocabulary()
    # Encode + write take up to 64 rows a task (fewer tasks: less work for the driver's
    # Ray Data executor) but never more than a shard's rows, so the rows a shard waits for
    # in the batcher, and the work a kill loses, stay bounded by the shard size (a fixed
    # 64 held small shards back for a whole run). Both are CPU task maps with the same
    # resources: Ray fuses them into one task, and the rows never leave that worker.
    write_batch = min(int(opts.rows_per_file), ENCODE_BATCH_ROWS)
    ds = ds.map_batches(encode_rows, batch_size=write_batch, batch_format="numpy", num_cpus=task_cpus,
                        fn_kwargs={"rle": opts.rle, "class_names": list(vocab.names) if vocab is not None else None})
    ds = ds.map_batches(write_rows, batch_size=None, batch_format="pyarrow", num_cpus=task_cpus,
                        fn_kwargs={"output": committer.output, "metadata": committer.metadata,
                                   "policy": committer.policy})
    return ds


def _class_kwargs(opts: LabelOptions) -> dict[str, Any]:
    """LabelActor's vocabulary arguments: none without a vocabulary (the actor then names nothing)."""
    vocab = opts.resolved_vocabulary()
    if vocab is None:
        return {}
    return {"vocabulary": list(vocab.names), "class_voting": opts.class_voting,
            "class_threshold": float(opts.class_threshold)}


def _model_info(ray: Any, checked: Checked, opts: LabelOptions, dtype: str,
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
    problem = anchor_grid_problem(opts.num_points, info["attention_resolutions"], opts.model, info["image_size"])
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
        return {"error": _one_line(exc.what)}
    except Exception as exc:  # noqa: BLE001 - a bad size or dtype, a broken file: one line for the driver
        return {"error": f"{type(exc).__name__}: {_one_line(exc)}"}


def summarize(
    opts: LabelOptions, input: str, output: str, root: str, manifest: dict, markers: list[dict], sink: Committer,
    total_shards: int, skipped: int, new_shards: int, times: dict[str, float], started: float,
) -> dict[str, Any]:
    """Counts over the whole output (all runs) and this run's throughput and stage times.

    A rate that cannot be measured (nothing labelled; one batch only) is None, not 0.
    """
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
    stage["write (worker s)"] = round(sink.write_seconds, 3)
    stage["commit (driver s)"] = round(sink.driver_seconds, 3)
    steady = sink.steady_rate()
    return {
        "input": input,
        "output": output,
        "model": manifest["model"].get("model"),
        "random_weights": bool(manifest["model"].get("random_weights")),
        "demo_model": bool(manifest["model"].get("demo_model")),
        "images": images,
        "labelled": images - errors,
        "errors": errors,
        "errors_by_kind": dict(sorted(errors_by_kind.items())),
        "shards": {"total": total_shards, "done": len(markers), "skipped_already_done": skipped,
                   "written_this_run": len(sink.committed), "new_in_plan": new_shards},
        "this_run": {"images": sink.rows, "labelled": sink.rows - run_errors,
                     "errors_by_kind": dict(sorted(sink.errors.items())), "duplicates_dropped": sink.duplicates,
                     "error_rows_retried": sink.replaced},
        "complete": len(markers) == total_shards and not sink.open,
        "seconds": round(time.time() - started, 3),
        "images_per_s": round(sink.rows / pipeline_s, 3) if sink.rows and pipeline_s > 0 else None,
        "steady_images_per_s": round(steady, 3) if steady > 0 else None,
        "stage_seconds": stage,
        # the driver process's CPU over the stream, actor start-up included (benchmarks/driver_bench.py
        # takes the slope between two sizes): what bounds one job's scale
        "driver": {"cpu_s_pipeline": round(sink.pipeline_cpu, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
                   "memory_releases": sink.memory_releases},
    }


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / (1 << 20)


# ---------------------------------------------------------------------------- helpers


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
        raise LabelError(f"Vocabulary: {_one_line(exc)}.") from None
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
    from diffseg_core.parameters import boundaries_problem
    from diffseg_core.regions import cleaning_problem

    problem = (boundaries_problem(opts.boundaries if opts.boundaries is not None else "off",
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


def _storage_sentence(output: str, exc: BaseException) -> str:
    """One sentence for a storage fault of the output's bookkeeping that outlived the retries."""
    refusal = storage_refusal(exc)
    if refusal:
        return (f"Cannot write the output {output!r}: {refusal} ({describe(exc)}); free space or fix its "
                "permissions, then rerun the same command to resume.")
    if is_transient(exc):
        return (f"The output {output!r} stayed unreachable ({describe(exc)}); rerun the same command when it "
                "is reachable: committed shards are kept.")
    return f"Cannot use the output {output!r}: {describe(exc)}."


def _own_markers(fs: Any, root: str, part: Part, policy: RetryPolicy | None = None) -> tuple[dict[int, dict],
                                                                                              list[str]]:
    """The markers (and torn markers) of ``part``'s shards: every shard's for a whole run."""
    markers, torn = read_markers(fs, root, policy)
    if part.partitioned:
        markers = {sid: m for sid, m in markers.items() if part.owns_shard(sid)}
    return markers, torn


def _own_manifest(fs: Any, root: str, part: Part) -> dict[str, Any] | None:
    """A part's own manifest (its runs so far), None on its first run; a torn one starts afresh."""
    try:
        found = read_json(fs, f"{root}/{part.manifest_name}")
    except TornFileError:
        return None
    return found if isinstance(found, dict) else None


def _write_manifests(fs: Any, root: str, manifest: dict[str, Any], part: Part,
                     policy: RetryPolicy) -> dict[str, Any] | None:
    """This run's manifest, then (a part) the output's ``_manifest.json`` merged from every part's,
    then the dataset card. Returns what ``_manifest.json`` now says."""
    write_manifest(fs, root, manifest, policy, name=part.manifest_name)
    merged = write_merged_manifest(fs, root, part.count, policy) if part.partitioned else manifest
    write_dataset_card(fs, root, merged or manifest)
    return merged


def _tidy_after_stop(fs: Any, root: str, part: Part = Part.whole()) -> None:
    """After Ctrl-C / SIGTERM (Ray stopped): move committed shards' staged files in, delete the rest."""
    try:
        markers, torn = _own_markers(fs, root, part)
        clean_uncommitted(fs, root, markers, torn, part=part)
    except Exception as exc:  # noqa: BLE001 - the next run cleans up the same way
        logger.warning("could not remove this run's uncommitted files: %s (the next run does)", describe(exc))


def _remove_previous_output(fs: Any, root: str) -> None:
    """--overwrite: delete only what this tool writes (never other files in the folder)."""
    for name in (MANIFEST, PLAN, DONE_DIR, TMP_DIR, STAGED_DIR):
        path = f"{root}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=True)
    for p in fs.ls(root, detail=False):
        if shard_of_part(p) is not None:
            fs.rm(p)
        elif part_of_file(p) is not None:
            fs.rm(p)  # the plans, manifests and dead leases of an output labelled in parts (none runs: check_layout)


def _init_ray(address: str | None) -> tuple[Any, bool]:
    """Start a local Ray, or join the cluster asked for (pipeline/ray_connect.py); (ray, whether this call did)."""
    return init_ray(address, log_to_driver=True)


def _shutdown(ray: Any, own_ray: bool) -> None:
    """Stop the local Ray this run started (its actors and tasks with it); leave a joined one alone."""
    if ray is not None and own_ray:
        ray.shutdown()


def _default_actors(opts: LabelOptions, use_gpu: bool, gpus_per_actor: float, resources: dict[str, float]) -> int:
    """One per GPU (or CPUs - 1); a part of N (``--part i/N``) on the cluster takes its 1/N share,
    since the other parts' jobs run beside it."""
    share = Part.parse(opts.part).count
    if use_gpu:
        return max(1, int(math.floor(float(resources.get("GPU", 0)) / share / gpus_per_actor)))
    cpus = float(resources.get("CPU", 1))
    return max(1, int(((cpus - 1.0) / share) // opts.cpus_per_actor))


def _decode_memory(image_size: int) -> int:
    """What a decode task holds: a Python worker (120 MiB with numpy/PIL/pyarrow; 240 MiB measured
    once Ray has reused it for a task that imported torch), one decoded source image, and a chunk
    of resized pixels twice over. Ray Data warns after a run unless this is 1.25x what it saw."""
    from pipeline.job.tasks import DECODE_CHUNK

    return 384 * 2**20 + 2 * DECODE_CHUNK * image_size * image_size * 3


def _run_options(opts: LabelOptions, devices: DevicePlan) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("storage_options", None)  # may hold credentials
    d.update(use_gpu=devices.use_gpu, gpus_per_actor=devices.gpus_per_actor)
    return d


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."
