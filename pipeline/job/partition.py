"""Which jobs may write an output: one whole run, or the N parts of a ``--part i/N`` run.

The two layouts name their plan, lease and manifest differently (pipeline/data/parts.py), so
a whole run and a part, or parts of different N, would plan the same images under
colliding shard ids. Checked after this run's own lease is taken: of two runs that start
together, at least one sees the other's lease and stops.
"""
from __future__ import annotations

import posixpath
from typing import Any

from pipeline.data.parts import Part, part_of_file
from pipeline.data.schema import LEASE, PLAN
from pipeline.errors import LabelError
from pipeline.job import lease


def check_layout(fs: Any, root: str, part: Part, output: str, previous: dict[str, Any] | None,
                 overwrite: bool = False) -> None:
    """Raise LabelError (one sentence) when ``output`` belongs to runs of another layout (a whole
    run's ``--overwrite`` may start over an output of parts, once none of them runs)."""
    names = [posixpath.basename(p) for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    recorded = ((previous or {}).get("parts") or {}).get("count")  # a merged manifest's N
    counts = {p.count for p in map(part_of_file, names) if p is not None} | ({recorded} if recorded else set())
    others = sorted(counts - {part.count})  # parts of another N (every part file has N > 1)
    count = others[0] if others else None
    if part.partitioned:
        if PLAN in names:
            raise LabelError(
                f"{output} was labelled by one job, not in parts; rerun it without --part, or label into a new "
                f"output with --part {part}.")
        if LEASE in names and lease.holder(fs, f"{root}/{LEASE}") is not None:
            raise LabelError(f"{output} is being written by a run without --part; wait for it to finish.")
        if count:
            raise LabelError(
                f"{output} is labelled in {count} parts, not {part.count}: run each part with --part i/{count} "
                f"(i = 1..{count}).")
        return
    if count:
        live = [n for n in names if n.startswith("_lease.") and part_of_file(n) is not None
                and lease.holder(fs, f"{root}/{n}") is not None]
        if live:
            raise LabelError(f"{output} is being labelled in {count} parts (part {part_of_file(live[0])} runs now); "
                             "wait for them to finish.")
        if overwrite:
            return
        raise LabelError(
            f"{output} is labelled in {count} parts: run each part with --part i/{count} (i = 1..{count}), or pass "
            "--overwrite to start over as one job.")
