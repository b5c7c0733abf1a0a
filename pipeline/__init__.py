"""The labeling job on Ray Data and the commands that come after it, in three rooms.

Entry points: ``pipeline.label(input, output, **options) -> summary`` and the
``diffseg`` command (pipeline/cli.py: ``label`` here, the others in their rooms).

- ``pipeline.job``: the labeling job itself, from an input URL to committed Parquet
  shards (``run.label`` reads top to bottom: ``options``, ``preflight``, devices, the
  shard plan (``work``), the Ray Data graph (``dataflow``: the stages in ``tasks`` and
  ``actors``, the workers' ``sink``, the driver's ``commit``), ``bookkeeping``).
- ``pipeline.after``: what users run on finished labels: ``eval`` (with
  ``baselines`` and the ground-truth readers in ``datasets_gt``), ``export``,
  ``show`` (``gallery``), and the training ``reader``.
- ``pipeline.tune``: ``diffseg tune``, method parameters chosen on a labelled sample.
- ``pipeline.data``: what every room reads and writes the same way: input listing
  and image decoding (``sources``, ``decode``), the output format (``schema``,
  ``encode``, ``manifest``, ``resume``'s shard markers, ``label_files``), files that
  are whole or absent (``storage``, ``retry``), and ``credentials``.

Imports point one way: ``job``, ``after`` and ``tune`` use ``data``, and ``tune`` builds on
``job`` (its options) and ``after`` (ground-truth readers); ``data`` uses
none of them; ``after`` does not import ``job``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["label", "LabelError", "LabelOptions"]


def __getattr__(name: str) -> Any:  # lazy: `import pipeline` must not import Ray
    if name == "label":
        from pipeline.job.run import label

        return label
    if name == "LabelError":
        from pipeline.errors import LabelError

        return LabelError
    if name == "LabelOptions":
        from pipeline.job.options import LabelOptions

        return LabelOptions
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
