"""``--part i/N``: N jobs label one input into one output, each a disjoint part of it.

One driver orchestrates a bounded number of GPUs (BENCHMARKS.md, "The driver's CPU per
image"); past that, N jobs each take a part. A part owns:

  * the inputs whose URI (relative to the input root) hashes to it: a stable, listing-order
    free split, so every part decides alone which files are its own and a file added later
    lands in exactly one part;
  * the shard ids ``k * N + (i - 1)``: disjoint across parts, so the shard files
    (``labels-<shard>-*.parquet``), markers (``_done/<shard>.json``), spill and staged folders
    of two parts never share a name;
  * its own lease, plan and manifest: ``_lease.part-0001-of-0004.json``, ``_plan.part-...``,
    ``_manifest.part-...``. ``_manifest.json`` is their merge (pipeline/data/manifest.py).

A part never reads or deletes another part's uncommitted files: every cleanup is scoped by
``owns_shard``. Readers see one dataset: the committed files of all parts at the root.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pipeline.data.schema import LEASE, MANIFEST, PLAN

_PART_FILE = re.compile(r"^_(?:lease|plan|manifest)\.part-(\d{4})-of-(\d{4})\.")
MAX_PARTS = 9999


@dataclass(frozen=True)
class Part:
    """Part ``index`` (1-based) of ``count``; ``Part.whole()`` (1 of 1) is an unpartitioned run."""

    index: int = 1
    count: int = 1

    @classmethod
    def whole(cls) -> "Part":
        return cls(1, 1)

    @classmethod
    def parse(cls, text: "str | Part | None") -> "Part":
        """``"2/4"`` -> Part(2, 4); None -> the whole. ValueError (one sentence) for anything else."""
        if text is None:
            return cls.whole()
        if isinstance(text, Part):
            return text
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ValueError(f"--part takes i/N (this job's part i of N, e.g. 1/4), not {text!r}")
        index, count = int(m.group(1)), int(m.group(2))
        if not 1 <= count <= MAX_PARTS or not 1 <= index <= count:
            raise ValueError(f"--part i/N needs 1 <= i <= N <= {MAX_PARTS}, not {text!r}")
        return cls(index, count)

    @property
    def partitioned(self) -> bool:
        return self.count > 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        return f"part-{self.index:04d}-of-{self.count:04d}"

    @property
    def lease_name(self) -> str:
        return LEASE if not self.partitioned else f"_lease.{self.tag}.json"

    @property
    def plan_name(self) -> str:
        return PLAN if not self.partitioned else f"_plan.{self.tag}.jsonl.gz"

    @property
    def manifest_name(self) -> str:
        """Where this run's own manifest goes: ``_manifest.json`` itself for a whole run."""
        return MANIFEST if not self.partitioned else f"_manifest.{self.tag}.json"

    def first_shard_id(self) -> int:
        return self.index - 1

    def owns_shard(self, shard_id: int) -> bool:
        return shard_id % self.count == self.index - 1

    def owns_input(self, uri: str, input_root: str) -> bool:
        if not self.partitioned:
            return True
        root = input_root.rstrip("/") + "/"
        key = uri[len(root):] if uri.startswith(root) else uri
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index - 1


def part_of_file(name: str) -> Part | None:
    """The part a bookkeeping file (``_lease.part-0002-of-0004.json``, ...) belongs to, or None."""
    m = _PART_FILE.match(name.rsplit("/", 1)[-1])
    return Part(int(m.group(1)), int(m.group(2))) if m else None
