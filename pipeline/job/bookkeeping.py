"""A run's bookkeeping in the output: its manifest (opened, then closed with this run's entry), the
run summary, the dataset card, and the tidy-up after --overwrite or a stop.

The manifest is written first and last (``write_manifests``), so ``load_dataset(OUTPUT)`` works at
every moment; a part writes its own and merges the output's from every part's.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from pipeline.data.manifest import new_manifest, write_manifest, write_merged_manifest
from pipeline.data.parts import Part, part_of_file
from pipeline.data.resume import clean_uncommitted
from pipeline.data.retry import RetryPolicy, describe
from pipeline.data.schema import DONE_DIR, MANIFEST, PLAN, STAGE_NAMES, STAGED_DIR, TMP_DIR, shard_of_part
from pipeline.data.storage import TornFileError, read_json
from pipeline.job.commit import Committer
from pipeline.job.dataset_card import write_dataset_card
from pipeline.job.devices import DevicePlan
from pipeline.job.options import LabelOptions
from pipeline.job.preflight import Checked
from pipeline.job.work import Work, own_markers

logger = logging.getLogger(__name__)

__all__ = ["open_manifest", "write_manifests", "close_run", "summarize", "tidy_after_stop",
           "remove_previous_output"]


def open_manifest(checked: Checked, opts: LabelOptions, part: Part, model_info: dict[str, Any],
                  parameters: dict[str, Any]) -> dict[str, Any]:
    """This run's manifest ("running"): the earlier runs of the output (or of the part) and this run's
    model and parameters. Not written yet."""
    previous = own_manifest(checked.out_fs, checked.out_root, part) if part.partitioned else checked.previous
    manifest = new_manifest(checked.input_root, checked.output, model_info, parameters, previous)
    if part.partitioned:
        manifest["part"] = str(part)
    vocab = opts.resolved_vocabulary()
    if vocab is not None:  # the names and their hash; the hash is a label parameter too
        manifest["vocabulary"] = vocab.to_json()
    return manifest


def close_run(checked: Checked, opts: LabelOptions, part: Part, policy: RetryPolicy, manifest: dict[str, Any],
              work: Work, committer: Committer, times: dict[str, float], started: float,
              devices: DevicePlan, interrupted: bool = False, nothing_to_do: bool = False) -> dict[str, Any]:
    """The run summary (see ``summarize``), and the manifest closed with it: its status ("complete",
    "incomplete" or "interrupted"), the output's counts and this run's entry; ``nothing_to_do``: a
    rerun that found every shard committed and nothing to retry before Ray started (said in both)."""
    out_fs, out_root = checked.out_fs, checked.out_root
    final_markers, _ = own_markers(out_fs, out_root, part, policy)
    markers = list(final_markers.values())
    summary = summarize(opts, checked.input, checked.output, checked.input_root, manifest, markers, committer,
                        work.plan.shards, len(work.done), work.plan.new, times, started)
    summary["nothing_to_do"] = nothing_to_do
    if part.partitioned:
        summary["part"] = str(part)
    if work.skipped.count:
        summary["skipped_inputs"] = work.skipped.to_json()
        logger.warning("%s", work.skipped.sentence())
    if interrupted and not summary["complete"]:
        manifest["status"] = "interrupted"
    else:
        manifest["status"] = "complete" if summary["complete"] else "incomplete"
    manifest["counts"] = {k: summary[k] for k in ("images", "labelled", "errors", "errors_by_kind", "shards")}
    run = {
        "started_at": started,
        "finished_at": time.time(),
        "status": manifest["status"],
        "options": _run_options(opts, devices),
        "this_run": summary["this_run"],
        "seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
        "stage_seconds": summary["stage_seconds"],
    }
    if nothing_to_do:
        run["nothing_to_do"] = True
    manifest["runs"].append(run)
    merged = write_manifests(out_fs, out_root, manifest, part, policy)  # load_dataset(OUTPUT) reads the labels
    if part.partitioned:
        summary["parts"] = merged.get("parts", {}) if merged else {}
    return summary


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
        # how the labels were grouped and refined: the manifest's own keys (absent: kl-merge, off)
        "method": {k: v for k, v in (manifest.get("parameters") or {}).items()
                   if k in ("grouping", "ncut_threshold", "ncut_affinity", "boundaries")},
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


def own_manifest(fs: Any, root: str, part: Part) -> dict[str, Any] | None:
    """A part's own manifest (its runs so far), None on its first run; a torn one starts afresh."""
    try:
        found = read_json(fs, f"{root}/{part.manifest_name}")
    except TornFileError:
        return None
    return found if isinstance(found, dict) else None


def write_manifests(fs: Any, root: str, manifest: dict[str, Any], part: Part,
                     policy: RetryPolicy) -> dict[str, Any] | None:
    """This run's manifest, then (a part) the output's ``_manifest.json`` merged from every part's,
    then the dataset card. Returns what ``_manifest.json`` now says."""
    write_manifest(fs, root, manifest, policy, name=part.manifest_name)
    merged = write_merged_manifest(fs, root, part.count, policy) if part.partitioned else manifest
    write_dataset_card(fs, root, merged or manifest)
    return merged


def tidy_after_stop(fs: Any, root: str, part: Part = Part.whole()) -> None:
    """After Ctrl-C / SIGTERM (Ray stopped): move committed shards' staged files in, delete the rest."""
    try:
        markers, torn = own_markers(fs, root, part)
        clean_uncommitted(fs, root, markers, torn, part=part)
    except Exception as exc:  # noqa: BLE001 - the next run cleans up the same way
        logger.warning("could not remove this run's uncommitted files: %s (the next run does)", describe(exc))


def remove_previous_output(fs: Any, root: str) -> None:
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


def _run_options(opts: LabelOptions, devices: DevicePlan) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("storage_options", None)  # may hold credentials
    d.update(use_gpu=devices.use_gpu, gpus_per_actor=devices.gpus_per_actor)
    return d
