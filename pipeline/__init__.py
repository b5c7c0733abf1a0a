"""Ray Data plumbing: sources, decoding, the GPU actor, merge workers, the Parquet sink, resume, the CLI.

Entry points: ``pipeline.label(input, output, **options) -> summary`` and the
``diffseg label`` command (pipeline/cli.py). Modules, one job each:
preflight (the checks before Ray starts), devices (GPUs or CPUs), sources (listing,
reading bytes), decode (bytes -> RGB S x S), actors (model and merge actors), labels
(proposals -> label map at the image's size), encode (PNG, segments, RLE), tasks (the
CPU stages), sink (workers write spill parts and finalize shards), commit (the driver:
part records -> markers), storage (files whole or absent), retry (storage hiccups vs
bad images), lease (one writer per output), redo (--retry-errors), resume (shard plan,
what is left), shard_source (the plan's shards as a Ray Data source), manifest
(provenance), interrupt (Ctrl-C / SIGTERM), stderr_filter (Ray's known false alarm),
errors, plan (label()), cli.
"""
from __future__ import annotations

from typing import Any

__all__ = ["label", "LabelError", "LabelOptions"]


def __getattr__(name: str) -> Any:  # lazy: `import pipeline` must not import Ray
    if name in __all__:
        from pipeline import plan

        return getattr(plan, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
