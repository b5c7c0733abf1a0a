"""What a run has to do: the input listed into the output's shard plan, the shards its markers say
are committed, and the committed error rows ``--retry-errors`` redoes.

``plan_work`` lists and plans once (streamed: pipeline/data/containers.py, resume.py); ``Work.settle``
then drops the markers a rebuilt plan no longer matches, removes what a killed run left, and reads
the rows to redo. Neither needs Ray, so a rerun can find it has nothing to do before Ray starts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.containers import plan_inputs
from pipeline.data.parts import Part
from pipeline.data.resume import (
    PlanSummary,
    clean_uncommitted,
    drop_markers,
    read_markers,
    update_plan_rebuilding,
)
from pipeline.data.retry import RetryPolicy
from pipeline.data.sources import SkippedInputs
from pipeline.errors import LabelError, one_line
from pipeline.job.failures import OUTPUT_FULL_ERRNOS, storage_sentence
from pipeline.job.options import LabelOptions
from pipeline.job.preflight import Checked
from pipeline.job.redo import rows_to_retry

logger = logging.getLogger(__name__)

__all__ = ["Work", "plan_work", "own_markers"]


@dataclass
class Work:
    """The shard plan and where the output stands against it (this part's shards only, for a part)."""

    plan: PlanSummary
    markers: dict[int, dict]  # committed shards' markers
    torn: list[str]  # torn markers (a killed run's)
    dropped: list[int]  # committed shards a rebuilt plan no longer matches: redone
    skipped: SkippedInputs  # FIFOs, sockets, devices with an input's name: never opened
    seconds: float  # listing and planning so far
    done: set[int] = field(default_factory=set)
    retry_rows: dict[int, list] = field(default_factory=dict)  # --retry-errors: shard -> rows to redo
    settled: bool = False

    def settle(self, fs: Any, root: str, part: Part, retry_errors: list[str] | None) -> None:
        """Drop the markers the plan no longer matches, remove uncommitted files, read the rows to redo."""
        if self.settled:
            return
        t = time.perf_counter()
        if self.dropped:
            logger.warning("the shard plan was rebuilt: %d committed shard(s) no longer match it and are redone",
                           len(self.dropped))
            drop_markers(fs, root, self.markers, self.dropped)
        self.done = set(self.markers)
        removed = clean_uncommitted(fs, root, self.markers, self.torn, part=part)
        self.retry_rows = rows_to_retry(fs, root, self.markers, retry_errors) if retry_errors else {}
        self.seconds += time.perf_counter() - t
        self.settled = True
        if removed:
            logger.warning("removed %d uncommitted file(s) left by an earlier run", len(removed))

    def nothing_to_do(self) -> bool:
        """Settled, every planned shard committed and no error row to redo."""
        return self.settled and not len(self.plan.index.without(self.done)) and not self.retry_rows


def own_markers(fs: Any, root: str, part: Part, policy: RetryPolicy | None = None) -> tuple[dict[int, dict],
                                                                                           list[str]]:
    """The markers (and torn markers) of ``part``'s shards: every shard's for a whole run."""
    markers, torn = read_markers(fs, root, policy)
    if part.partitioned:
        markers = {sid: m for sid, m in markers.items() if part.owns_shard(sid)}
    return markers, torn


def plan_work(checked: Checked, opts: LabelOptions, part: Part, policy: RetryPolicy) -> Work:
    """Read the markers, list the input and extend (or rebuild) the saved shard plan: once per run."""
    out_fs, out_root = checked.out_fs, checked.out_root
    t = time.perf_counter()
    markers, torn = own_markers(out_fs, out_root, part, policy)
    skipped = SkippedInputs()
    try:
        plan, dropped = update_plan_rebuilding(
            out_fs, out_root,
            lambda: plan_inputs(checked.input, opts.storage_options, opts.rows_per_file, out_fs, out_root, skipped,
                                part, checked.input_root),
            opts.rows_per_file, markers, part)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in OUTPUT_FULL_ERRNOS:  # writing the plan, not listing
            raise LabelError(storage_sentence(checked.output, exc)) from None
        raise LabelError(f"Cannot list input {checked.input!r}: {type(exc).__name__}: {one_line(exc)}") from None
    return Work(plan, markers, torn, dropped, skipped, time.perf_counter() - t, done=set(markers))
