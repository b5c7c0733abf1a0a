"""``label()``: the whole job, from an input URL to a committed Parquet dataset, as numbered steps.

Cheapest and most likely to fail first:

  1. the request: no credentials inside URLs, an output outside the input, the options
     (pipeline/job/options.py) filled in from the model and judged;
  2. the checks before Ray starts (pipeline/job/preflight.py): the model's configs and file
     headers (no weights), the output's manifest, the input's first file, a writable output;
     so a wrong path fails in a second;
  3. the output's lease (one writer per output, or per part) and its layout (pipeline/job/partition.py);
  3a. a rerun (no --overwrite) whose manifest check needs no cluster: that check, the listing and
     the shard plan (step 6) before Ray; with every shard committed and nothing to retry, the run
     is closed ("nothing to do") and Ray never starts;
  4. ``ray.init``; GPUs or CPUs (pipeline/job/devices.py), hence the default dtype; the model's
     provenance (pipeline/job/model_info.py) and the manifest check of what depends on it;
  5. --overwrite deletes the old labels; the manifest written ("running") (pipeline/job/bookkeeping.py);
  6. the input listed and the shard plan extended, both streamed; what a killed run left is
     dropped, committed shards are skipped (pipeline/job/work.py);
  7. Ray Data (pipeline/job/dataflow.py): shards -> read+decode (CPU tasks) -> LabelActor pool
     -> encode + write (CPU tasks: spill parts on the workers) -> part records
     -> the Committer in the driver (a finalize task per shard, its marker);
  8. the summary and the manifest: "complete", "incomplete" or, after Ctrl-C / SIGTERM, "interrupted";
     a shard left uncommitted is a LabelError.

The driver never loads the model (a small head node is enough); the model actors do.
Nor does it see a label row: the workers write them. It holds the output's lease from the
checks to the end. Failures become LabelError in one place: ``failures.label_errors``.
"""
from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.data.credentials import refuse_url_credentials
from pipeline.data.parts import Part
from pipeline.data.resume import shards_by_id
from pipeline.data.retry import RetryPolicy
from pipeline.data.sources import output_in_input
from pipeline.errors import LabelError
from pipeline.job import lease
from pipeline.job.block_stats import bound_block_stats
from pipeline.job.bookkeeping import close_run, open_manifest, remove_previous_output, tidy_after_stop, \
    write_manifests
from pipeline.job.commit import Committer
from pipeline.job.dataflow import build_dataset, drive, shard_dataset
from pipeline.job.devices import DevicePlan, plan_devices, plan_devices_before_ray
from pipeline.job.failures import check_all_committed, label_errors
from pipeline.job.interrupt import RunInterrupted, StopSignals, stop_signals
from pipeline.job.model_info import model_info
from pipeline.job.options import LabelOptions, validate_options
from pipeline.job.partition import check_layout
from pipeline.job.preflight import Checked, default_dtype, preflight
from pipeline.job.provenance import ProvenanceCheck, expected
from pipeline.job.redo import retry_item
from pipeline.job.sink import OutputLocation
from pipeline.job.work import Work, plan_work
from pipeline.ray_connect import init_ray, shutdown_ray

logger = logging.getLogger(__name__)

__all__ = ["label"]


def label(input: str, output: str, **options: Any) -> dict[str, Any]:
    """Label every image under ``input``; write Parquet pseudo-labels under ``output``.

    Options: the fields of LabelOptions. Returns the run summary (see ``bookkeeping.summarize``).
    Raises LabelError (one clear sentence) on systemic failures, and RunInterrupted
    (a KeyboardInterrupt) after SIGINT or SIGTERM, once the manifest says "interrupted".
    """
    opts = _request(input, output, options)  # 1
    started = time.time()
    times: dict[str, float] = {}
    with stop_signals() as stop:
        t = time.perf_counter()
        checked = preflight(input, output, opts)  # 2
        times["checks"] = time.perf_counter() - t
        part = Part.parse(opts.part)
        with label_errors(output):
            held = _hold_output(checked, part)  # 3
            try:
                with _discard_on_failure(checked, held):
                    check_layout(checked.out_fs, checked.out_root, part, output, checked.previous, opts.overwrite)
                    early = _plan_before_ray(checked, opts, part)  # 3a
                    if early is not None and early.work.nothing_to_do():
                        with stop.deferred():
                            return _close_nothing_to_do(checked, opts, part, early, times, started)
                    session = _start_ray(opts, stop, times)  # 4
                    settled = _settle_model(session, checked, opts)
                try:
                    return _label(session, stop, checked, opts, part, settled, times, started, held,  # 5-8
                                  early.work if early is not None else None)
                finally:
                    session.close()
                    if stop.received is not None:  # a clean stop leaves only what it committed
                        tidy_after_stop(checked.out_fs, checked.out_root, part)
            finally:
                held.release()


# ---------------------------------------------------------------------------- the steps


@dataclass
class _RaySession:
    """The Ray this run uses: started here (and stopped at the end) or joined (left alone)."""

    ray: Any
    own: bool

    def close(self) -> None:
        shutdown_ray(self.ray, self.own)


@dataclass
class _Settled:
    """What depends on the cluster: its devices, hence the dtype, and the model's provenance."""

    devices: DevicePlan
    dtype: str
    model_info: dict[str, Any]
    image_size: int
    parameters: dict[str, Any]


def _request(input: str, output: str, options: dict[str, Any]) -> LabelOptions:
    """Step 1: refuse what no run can use, before any work."""
    try:
        refuse_url_credentials(input, output, options.get("storage_options"))  # they would reach the manifest and logs
    except ValueError as exc:
        raise LabelError(str(exc)) from None
    problem = output_in_input(input, output, options.get("storage_options"))  # its labels would be read as images
    if problem:
        raise LabelError(problem)
    opts = LabelOptions(**options).with_model_defaults()
    validate_options(opts)
    return opts


def _hold_output(checked: Checked, part: Part) -> lease.Lease:
    """Step 3: one output (or part), one writer: before Ray starts, so a second run is refused in a second."""
    output = checked.output
    held = lease.acquire(checked.out_fs, checked.out_root,
                         f"part {part} of {output}" if part.partitioned else output, name=part.lease_name)
    held.start_heartbeat()
    return held


@contextmanager
def _discard_on_failure(checked: Checked, held: lease.Lease) -> Iterator[None]:
    """The run could not start: remove the output folder if this run made it and it is still empty
    (the lease goes first: it is the file that keeps the folder from being empty)."""
    try:
        yield
    except BaseException:
        held.release()
        checked.discard()
        raise


def _start_ray(opts: LabelOptions, stop: StopSignals, times: dict[str, float]) -> _RaySession:
    """Step 4: start a local Ray, or join the cluster asked for (pipeline/ray_connect.py)."""
    t = time.perf_counter()
    ray, own = init_ray(opts.ray_address, log_to_driver=True)
    stop.install()  # ray.init put its own SIGTERM handler in place
    times["ray start"] = time.perf_counter() - t
    return _RaySession(ray, own)


def _settle_model(session: _RaySession, checked: Checked, opts: LabelOptions) -> _Settled:
    """Step 4: devices, dtype and the model's provenance, checked against the output's manifest;
    the Ray this run started is stopped again if that fails."""
    try:
        devices = plan_devices(session.ray, opts.device, opts.gpus_per_actor, opts.gpu_wait_s)
        dtype = opts.dtype or default_dtype(devices.use_gpu)
        info, image_size = model_info(session.ray, checked, opts, dtype, devices)
        parameters = opts.label_parameters(image_size, dtype)
        checked.check_against_previous(info, parameters)
    except BaseException:
        session.close()
        raise
    return _Settled(devices, dtype, info, image_size, parameters)


@dataclass
class _Early:
    """A rerun listed and planned before Ray: what the manifest check settled without it, and the work."""

    settled: _Settled
    work: Work


def _plan_before_ray(checked: Checked, opts: LabelOptions, part: Part) -> _Early | None:
    """Step 3a: a rerun (no --overwrite) whose whole manifest check needs no Ray is checked, listed and
    planned now, so one with nothing to do never starts Ray; its plan is the one step 6 uses (the input
    is listed once). None (Ray first, as for a new output) where the check needs the cluster: a dtype
    only the cluster's GPUs decide, or a single-file checkpoint whose provenance only a load reveals.
    """
    if opts.overwrite or checked.previous is None or not checked.model.complete:
        return None
    devices = plan_devices_before_ray(opts.ray_address, opts.device, opts.gpus_per_actor, opts.gpu_wait_s)
    if devices is None:
        return None
    dtype = opts.dtype or default_dtype(devices.use_gpu)
    info = checked.model_info(opts, dtype, devices.use_gpu)
    parameters = opts.label_parameters(checked.image_size, dtype)
    checked.check_against_previous(info, parameters)  # the same check, and sentence, as after ray.init
    work = plan_work(checked, opts, part, _policy(opts))
    work.settle(checked.out_fs, checked.out_root, part, opts.retry_errors)
    return _Early(_Settled(devices, dtype, info, checked.image_size, parameters), work)


def _close_nothing_to_do(checked: Checked, opts: LabelOptions, part: Part, early: _Early, times: dict[str, float],
                         started: float) -> dict[str, Any]:
    """Every planned shard is committed and no error row is to redo: the run is closed as a complete
    rerun is (manifest entry, summary), with ``nothing_to_do`` in both, and Ray never starts."""
    policy = _policy(opts)
    manifest = open_manifest(checked, opts, part, early.settled.model_info, early.settled.parameters)
    committer = _committer(checked, opts, manifest, early.settled, policy)
    times["list+plan"] = early.work.seconds
    return close_run(checked, opts, part, policy, manifest, early.work, committer, times, started,
                     early.settled.devices, nothing_to_do=True)


def _policy(opts: LabelOptions) -> RetryPolicy:
    return RetryPolicy(deadline_s=float(opts.storage_retry_s))


def _label(session: _RaySession, stop: StopSignals, checked: Checked, opts: LabelOptions, part: Part,
           settled: _Settled, times: dict[str, float], started: float, held: lease.Lease,
           work: Work | None = None) -> dict[str, Any]:
    """Steps 5-8: from a checked, compatible output to a committed one (the part that writes);
    ``work``: the plan step 3a made already (a rerun), else listed and planned here."""
    out_fs, out_root = checked.out_fs, checked.out_root
    if opts.overwrite:  # only now: a run that cannot even start must not delete labels
        remove_previous_output(out_fs, out_root)
    policy = _policy(opts)
    manifest = open_manifest(checked, opts, part, settled.model_info, settled.parameters)
    write_manifests(out_fs, out_root, manifest, part, policy)  # first: load_dataset(OUTPUT) works at every moment

    if work is None:
        work = plan_work(checked, opts, part, policy)  # 6
    committer = _committer(checked, opts, manifest, settled, policy)
    interrupted: RunInterrupted | None = None
    t = time.perf_counter()
    try:  # from here on the plan is known: a stop says how many of its shards are committed
        work.settle(out_fs, out_root, part, opts.retry_errors)
        times["list+plan"] = work.seconds
        t = time.perf_counter()
        _stream(session.ray, checked, opts, part, settled, work, committer, held)  # 7
    except RunInterrupted as exc:
        interrupted = exc  # open shards are dropped: uncommitted, a rerun redoes them
    times["pipeline"] = time.perf_counter() - t

    with stop.deferred():  # 8
        gc.collect()
        summary = close_run(checked, opts, part, policy, manifest, work, committer, times, started,
                            settled.devices, interrupted=interrupted is not None)
    if interrupted is not None:
        interrupted.committed, interrupted.total = summary["shards"]["done"], work.plan.shards
        raise interrupted
    check_all_committed(committer, policy)
    return summary


def _committer(checked: Checked, opts: LabelOptions, manifest: dict[str, Any], settled: _Settled,
               policy: RetryPolicy) -> Committer:
    """The driver's side of the output: it checks each part record's provenance and commits shards."""
    metadata = {"model": manifest["model"], "parameters": settled.parameters, "version": manifest["version"],
                "input": checked.input_root}
    if "vocabulary" in manifest:
        metadata["vocabulary"] = manifest["vocabulary"]
    check = ProvenanceCheck(expected(opts, image_size=settled.image_size, dtype=settled.dtype,
                                     model_info=settled.model_info))
    return Committer(checked.out_fs, checked.out_root, OutputLocation(checked.output, opts.storage_options),
                     opts.rows_per_file, metadata, policy, provenance=check)


def _stream(ray: Any, checked: Checked, opts: LabelOptions, part: Part, settled: _Settled, work: Work,
            committer: Committer, held: lease.Lease) -> None:
    """Step 7: the shards not yet done and the error rows to redo, through the Ray Data graph."""
    out_fs, out_root = checked.out_fs, checked.out_root
    shards_ds, todo = shard_dataset(ray, out_fs, out_root, work.plan.index, opts.storage_options, work.done,
                                    part.plan_name)
    for shard_id in todo:
        committer.expect(shard_id)
    if work.retry_rows:  # --retry-errors: the rows to redo, as work items of their own
        plan_shards = shards_by_id(out_fs, out_root, work.retry_rows, part.plan_name)
        items = [retry_item(plan_shards[sid], rows) for sid, rows in sorted(work.retry_rows.items())]
        for sid, rows in work.retry_rows.items():
            committer.expect(sid, replace={"marker": work.markers[sid], "drop": [i for i, _ in rows]})
        retry_ds = ray.data.from_items(items, override_num_blocks=len(items))
        shards_ds = retry_ds if shards_ds is None else shards_ds.union(retry_ds)
    if shards_ds is None:
        return
    bound_block_stats()  # else Ray Data keeps a stats object per block in the driver until the end
    dataset = build_dataset(
        ray, shards_ds, checked.input_root, opts, image_size=settled.image_size, dtype=settled.dtype,
        use_gpu=settled.devices.use_gpu, gpus_per_actor=settled.devices.gpus_per_actor,
        resources=ray.cluster_resources(), committer=committer,
    )
    drive(dataset, committer, held)
