"""The plan's shards as a Ray Data source, read by Ray tasks: the driver never holds their paths.

Each read task gets a shard's (offset, length) in the plan file and reads that one gzip
member itself; the driver keeps three int64s per shard (see resume.PlanIndex).
"""
from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline.data.resume import PlanIndex, read_shard

SHARD_SCHEMA = pa.schema([("shard_id", pa.int64()), ("kind", pa.string()), ("paths", pa.list_(pa.string()))])


class PlanShards(Datasource):
    """One read task (one block, one row) per shard of ``index`` in the plan file at ``path``."""

    def __init__(self, path: str, index: PlanIndex, storage_options: dict[str, Any] | None):
        self.path = path
        self.index = index
        self.storage_options = storage_options

    def estimate_inmemory_data_size(self) -> int | None:
        return int(self.index.lengths.sum()) * 4

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [
            ReadTask(_reader(self.path, int(offset), int(length), self.storage_options),
                     BlockMetadata(num_rows=1, size_bytes=int(length) * 4, exec_stats=None, input_files=None),
                     schema=SHARD_SCHEMA)
            for offset, length in zip(self.index.offsets, self.index.lengths)
        ]


def _reader(path: str, offset: int, length: int, storage_options: dict[str, Any] | None):
    def read() -> Iterable[pa.Table]:
        from pipeline.data.sources import open_fs

        fs, stripped = open_fs(path, storage_options)
        shard = read_shard(fs, stripped, offset, length)
        yield pa.table({"shard_id": [shard.shard_id], "kind": [shard.kind], "paths": [list(shard.paths)]},
                       schema=SHARD_SCHEMA)

    return read
