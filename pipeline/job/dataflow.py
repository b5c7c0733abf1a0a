"""The Ray Data graph of a run and the driver loop that consumes it.

``shard_dataset``: the plan's shards not yet done, as a Ray dataset; ``build_dataset``: shards
-> read+decode (CPU tasks) -> LabelActor pool -> encode + write (CPU tasks: spill parts on the
workers) -> part records; ``drive``: the driver commits shards (pipeline/job/commit.py) as their
records arrive. The stage modules (tasks, actors, sink) are imported where the graph is built, so
importing this file loads neither torch nor the model code.
"""
from __future__ import annotations

import math
import time
from typing import Any

from pipeline.data.parts import Part
from pipeline.data.retry import describe
from pipeline.data.schema import PLAN
from pipeline.errors import LabelError
from pipeline.job.commit import Committer
from pipeline.job.options import LabelOptions

READ_CPUS = 0.25  # a plan-shard read task (see shard_dataset)
ENCODE_BATCH_ROWS = 64  # rows per encode + write task, at most (see build_dataset)

__all__ = ["shard_dataset", "build_dataset", "drive", "READ_CPUS", "ENCODE_BATCH_ROWS"]


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
