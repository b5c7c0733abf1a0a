"""A storage hiccup is not a bad image: an S3 server (moto on 127.0.0.1) stopped and restarted
mid-read and mid-commit, and ``--retry-errors`` for error rows committed by older versions."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import (
    FAST,
    encoded,
    make_photo_folder,
    photos,
    read_output,
    write_parquet_shard,
)

from pipeline import LabelError, label

OLD_OUTAGE_ERROR = ("read error: EndpointConnectionError: Could not connect to the endpoint URL: "
                    '"http://127.0.0.1:9/bucket/in/x.jpg"')


class RestartableS3:
    """moto's server on a fixed loopback port that can be stopped and started again (state is kept)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.up = True

    def stop(self) -> None:
        if self.up:
            self.server.stop()
            self.up = False

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if not self.up:
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
            self.server.start()
            self.up = True

    @property
    def options(self) -> dict:
        # botocore's own retries off: a refused connection fails at once and ours (pipeline/data/retry.py) act
        return {"key": "testing", "secret": "testing", "client_kwargs": {
            "endpoint_url": f"http://{self.host}:{self.port}", "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}


@pytest.fixture(scope="module")
def s3():
    import boto3
    import s3fs

    server = RestartableS3()
    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **server.options["client_kwargs"]).create_bucket(Bucket="faults")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options)
    yield server, fs
    server.stop()


def _in_background(fn) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = fn()
        except BaseException as exc:  # noqa: BLE001 - looked at by the test
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _no_committed_error_rows(table: pa.Table) -> None:
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    assert not errors, errors[:3]


class RequestWatch(logging.Handler):
    """Counts the requests moto's server logs (werkzeug, in this process) that match ``needle``."""

    def __init__(self, needle: str) -> None:
        super().__init__(level=logging.INFO)
        self.needle = needle
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.count += 1


@pytest.fixture
def requests_to():
    logger = logging.getLogger("werkzeug")
    level = logger.level
    logger.setLevel(logging.INFO)
    watches: list[RequestWatch] = []

    def watch(needle: str) -> RequestWatch:
        handler = RequestWatch(needle)
        logger.addHandler(handler)
        watches.append(handler)
        return handler

    yield watch
    for handler in watches:
        logger.removeHandler(handler)
    logger.setLevel(level)


def _stop_after(server: RestartableS3, watch: RequestWatch, n: int, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 300
    try:
        while thread.is_alive() and watch.count < n and time.monotonic() < deadline:
            time.sleep(0.005)
        server.stop()  # it stays down until the run has given up
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        server.start()


@pytest.mark.slow
def test_s3_down_during_reads_leaves_shards_uncommitted_and_the_rerun_finishes(
    ray_session, s3, tmp_path, requests_to
):
    server, fs = s3
    ids = []
    for i in range(6):
        for name, arr in photos().items():
            fs.pipe(f"faults/in/{name}-{i}.jpg", encoded(arr[::8, ::8], "JPEG"))
            ids.append(f"{name}-{i}.jpg")
    fs.invalidate_cache()
    out = tmp_path / "out"
    run = dict(storage_options=server.options, rows_per_file=1, storage_retry_s=2, **{**FAST, "batch_size": 1})
    reads = requests_to('"GET /faults/in/')
    thread, result = _in_background(lambda: label("s3://faults/in", str(out), **run))
    _stop_after(server, reads, 6, thread)  # 6 of 18 images read, then the server is gone
    assert isinstance(result.get("error"), LabelError), result
    message = str(result["error"])
    assert "were left uncommitted because storage stayed unreachable after retrying for 2 s" in message
    assert "rerun the same command" in message and "\n" not in message
    if list(out.glob("labels-*.parquet")):
        _no_committed_error_rows(read_output(str(out)))  # a good image is never committed as an error

    summary = label("s3://faults/in", str(out), **run)
    assert summary["complete"] and summary["images"] == len(ids) == summary["labelled"]
    table = read_output(str(out))
    got = table.column("image_id").to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == sorted(ids)
    _no_committed_error_rows(table)


@pytest.mark.slow
def test_s3_down_during_commits_ends_with_one_sentence_and_the_rerun_finishes(
    ray_session, s3, tmp_path, requests_to
):
    server, fs = s3
    src = tmp_path / "in"
    ids = make_photo_folder(src, copies=5)  # 15 images, 15 shards
    url = "s3://faults/out-commit"
    run = dict(storage_options=server.options, rows_per_file=1, storage_retry_s=2, **{**FAST, "batch_size": 1})
    markers = requests_to('"PUT /faults/out-commit/_done/')
    thread, result = _in_background(lambda: label(str(src), url, **run))
    _stop_after(server, markers, 2, thread)  # two shards committed, then the server is gone
    assert isinstance(result.get("error"), LabelError), result
    message = str(result["error"])
    assert "\n" not in message and "rerun the same command" in message
    assert "unreachable" in message

    summary = label(str(src), url, **run)
    assert summary["complete"] and summary["images"] == len(ids)
    assert summary["shards"]["skipped_already_done"] >= 1
    fs.invalidate_cache()
    table = read_output("faults/out-commit", filesystem=fs)
    got = table.column("image_id").to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == ids
    _no_committed_error_rows(table)
    assert not fs.find("faults/out-commit/_inprogress")


# ------------------------------------------------------------------------------ --retry-errors


def _forge_old_error_rows(out: Path, image_ids: set[str]) -> dict[int, list[str]]:
    """Turn these committed rows into what an older version committed during an outage."""
    touched: dict[int, list[str]] = {}
    for marker_path in sorted((out / "_done").glob("*.json")):
        marker = json.loads(marker_path.read_text())
        for name in marker["files"]:
            table = pq.read_table(out / name)
            rows = table.to_pylist()
            hit = [r["image_id"] for r in rows if r["image_id"] in image_ids]
            if not hit:
                continue
            for r in rows:
                if r["image_id"] in image_ids:
                    r.update(label_map=None, num_segments=None, segments=None, error=OLD_OUTAGE_ERROR)
            pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / name)
            marker["errors"]["read error"] = marker["errors"].get("read error", 0) + len(hit)
            marker_path.write_text(json.dumps(marker))
            touched.setdefault(marker["shard_id"], []).extend(hit)
    return touched


def test_retry_errors_redoes_chosen_error_rows_in_place_exactly_once(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=2)  # 6 images, 3 shards of 2
    rows_parquet = [encoded(photos()["coffee"][::8, ::8], "PNG"), encoded(photos()["chelsea"][::8, ::8], "PNG"),
                    b"not an image"]
    write_parquet_shard(src / "rows.parquet", rows_parquet, struct_column=False)
    ids += ["rows.parquet/0", "rows.parquet/1", "rows.parquet/2"]
    first = label(str(src), str(out), rows_per_file=2, **FAST)
    assert first["complete"] and first["errors_by_kind"] == {"not an image": 1}
    touched = _forge_old_error_rows(out, {ids[0], ids[1], ids[3], "rows.parquet/1"})
    before = sorted(p.name for p in out.glob("labels-*.parquet"))

    redo = label(str(src), str(out), rows_per_file=2, retry_errors=["read error"], **FAST)
    assert redo["complete"] and redo["images"] == 9 and redo["errors_by_kind"] == {"not an image": 1}
    assert redo["this_run"]["error_rows_retried"] == 4 and redo["this_run"]["images"] == 4  # only those rows
    assert redo["shards"]["written_this_run"] == len(touched)
    table = read_output(str(out))
    got = table.column("image_id").to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == sorted(ids)
    assert [e for e in table.column("error").to_pylist() if e] == ["not an image: 12 bytes in no image format "
                                                                   "Pillow reads"]
    after = sorted(p.name for p in out.glob("labels-*.parquet"))
    for shard_id in touched:  # a new generation of the shard's files; the old ones are gone
        marker = json.loads((out / "_done" / f"{shard_id:06d}.json").read_text())
        assert marker["generation"] == 1 and all(f.endswith("-g1.parquet") for f in marker["files"])
        assert marker["errors"] == ({"not an image": 1} if "rows.parquet/2" in _ids_of(out, marker) else {})
        assert not set(marker["files"]) & set(before) and set(marker["files"]) <= set(after)
    # nothing left to retry: a second pass changes nothing
    again = label(str(src), str(out), rows_per_file=2, retry_errors=["read error"], **FAST)
    assert again["this_run"]["images"] == 0 and sorted(p.name for p in out.glob("labels-*.parquet")) == after


def _ids_of(out: Path, marker: dict) -> set[str]:
    return {i for f in marker["files"] for i in pq.read_table(out / f, columns=["image_id"]).column(0).to_pylist()}
