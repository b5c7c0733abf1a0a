"""What a full disk, a torn bookkeeping file or a second run on the same output must not do."""
from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import FAST, make_photo_folder, read_output
from s3_server import moto_s3

from pipeline import cli, label
from pipeline.data.retry import storage_refusal
from pipeline.data.schema import LEASE
from pipeline.job.lease import LeaseHeldError, acquire

REPO = Path(__file__).resolve().parents[1]
FAST_ARGS = ["--model", "tiny-random", "--image-size", "64", "--num-points", "4", "--batch-size", "4"]


def _ids(out: Path) -> list[str]:
    return read_output(str(out)).column("image_id").to_pylist()


def _one_sentence_error(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.startswith("diffseg label: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------ the lease


def test_a_live_lease_refuses_a_second_writer_and_a_dead_one_is_taken_over(tmp_path):
    fs = fsspec.filesystem("file")
    first = acquire(fs, str(tmp_path), "labels/")
    with pytest.raises(LeaseHeldError, match=r"^labels/ is being written by another diffseg run \(run [0-9a-f]{8} "
                       rf"on {socket.gethostname()}, pid {os.getpid()}, last heartbeat 0 s ago\); wait for it"):
        acquire(fs, str(tmp_path), "labels/")
    first.renew()
    assert not first.lost
    first.release()
    assert not (tmp_path / LEASE).exists()

    # A lease of a process of this host that no longer exists (a killed run): taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease_file = tmp_path / LEASE
    lease_file.write_text(json.dumps({"run_id": "dead" * 8, "host": socket.gethostname(),
                                      "pid": int(dead.stdout), "heartbeat_at": time.time()}))
    taken = acquire(fs, str(tmp_path), "labels/")
    assert json.loads(lease_file.read_text())["run_id"] == taken.run_id

    # Another host's lease: refused while its heartbeat is fresh, taken over once stale.
    other = {"run_id": "b" * 32, "host": "elsewhere", "pid": 1, "heartbeat_at": time.time()}
    lease_file.write_text(json.dumps(other))
    taken.renew()
    assert taken.lost  # the first holder finds out that it lost the lease
    with pytest.raises(LeaseHeldError, match="on elsewhere, pid 1"):
        acquire(fs, str(tmp_path), "labels/")
    lease_file.write_text(json.dumps({**other, "heartbeat_at": time.time() - 3600}))
    assert acquire(fs, str(tmp_path), "labels/").run_id != other["run_id"]
    assert not [p for p in tmp_path.iterdir() if p.name != LEASE]  # no temp file left behind


def test_on_s3_the_lease_is_a_conditional_put(s3_server):
    fs, _ = s3_server
    root = "labels-bucket/lease-test"
    first = acquire(fs, root, "s3://labels-bucket/lease-test")
    with pytest.raises(LeaseHeldError, match="is being written by another diffseg run"):
        acquire(fs, root, "s3://labels-bucket/lease-test")
    first.renew()  # If-Match on its own ETag
    assert not first.lost
    stale = json.loads(fs.cat_file(f"{root}/{LEASE}"))
    fs.pipe_file(f"{root}/{LEASE}", json.dumps({**stale, "host": "elsewhere", "heartbeat_at": 0}).encode())
    second = acquire(fs, root, "s3://labels-bucket/lease-test")
    assert json.loads(fs.cat_file(f"{root}/{LEASE}"))["run_id"] == second.run_id
    second.release()
    assert not fs.exists(f"{root}/{LEASE}")


@pytest.fixture(scope="module")
def s3_server():
    with moto_s3("labels-bucket") as fs_and_options:
        yield fs_and_options


@pytest.mark.slow
def test_the_same_command_started_twice_is_refused_in_the_second_process(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=2)
    cmd = [sys.executable, "-m", "pipeline", "label", str(src), str(out), *FAST_ARGS, "--rows-per-file", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LEASE).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / LEASE).exists(), first.communicate()
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        first_out, first_err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.wait()
    assert second.returncode == 2
    line = _one_sentence_error(second.stderr)
    assert f"{out} is being written by another diffseg run" in line and f"pid {first.pid}" in line
    assert "Started a local Ray" not in second.stderr  # refused before Ray starts
    assert first.returncode == 0, first_err[-3000:]
    assert "labelled 6 of 6" in first_out
    assert sorted(_ids(out)) == ids and not (out / LEASE).exists()


# ------------------------------------------------------------------------------ torn files


def test_torn_manifest_marker_and_plan_are_detected_and_rebuilt(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=2)  # 6 images -> 3 shards of 2
    assert label(str(src), str(out), rows_per_file=2, **FAST)["complete"]
    manifest = (out / "_manifest.json").read_text()
    (out / "_manifest.json").write_text(manifest[: len(manifest) // 2])
    marker = (out / "_done" / "000001.json").read_text()
    (out / "_done" / "000001.json").write_text(marker[:20])
    plan = (out / "_plan.jsonl.gz").read_bytes()
    (out / "_plan.jsonl.gz").write_bytes(plan[: len(plan) // 2])

    again = label(str(src), str(out), rows_per_file=2, **FAST)
    assert again["complete"] and again["images"] == 6
    assert again["shards"]["written_this_run"] == 1 and again["this_run"]["images"] == 2  # shard 1 only
    assert sorted(_ids(out)) == ids
    rebuilt = json.loads((out / "_manifest.json").read_text())
    assert rebuilt["status"] == "complete" and rebuilt["model"]["model"] == "tiny-random"
    assert rebuilt["parameters"]["num_points"] == 4
    with gzip.open(out / "_plan.jsonl.gz", "rt") as f:
        assert sum('"shard_id"' in line for line in f) == 3  # the rebuilt plan
    # the identity checked on resume survived the rebuild: other settings are still refused
    from pipeline import LabelError

    with pytest.raises(LabelError, match="different settings"):
        label(str(src), str(out), rows_per_file=2, **{**FAST, "num_points": 2})


# ------------------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs root and mount rights; skipped where mounting is impossible)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_the_run_with_one_sentence_and_the_rerun_finishes(ray_session, small_disk, tmp_path, capsys):
    src, out = tmp_path / "in", small_disk / "labels"
    ids = make_photo_folder(src, copies=4)  # 12 images -> 6 shards
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 40 * 1024))  # room for the bookkeeping, not for the labels
    args = ["label", str(src), str(out), *FAST_ARGS, "--rows-per-file", "2", "--storage-retry-s", "1"]
    assert cli.main(args) == 2
    line = _one_sentence_error(capsys.readouterr().err)
    assert f"Cannot write the output {str(out)!r}: no space left on the device" in line
    assert line.endswith("then rerun the same command to resume.")
    for marker in (out / "_done").glob("*.json") if (out / "_done").exists() else []:
        json.loads(marker.read_text())  # every bookkeeping file left behind is whole
    json.loads((out / "_manifest.json").read_text())

    filler.unlink()
    assert cli.main(args) == 0, capsys.readouterr().err[-3000:]
    assert "labelled 12 of 12" in capsys.readouterr().out
    assert sorted(_ids(out)) == ids
    for part in out.glob("labels-*.parquet"):
        pq.read_table(part)  # every file readable

    # a read-only disk is told apart the same way (a real EROFS from the kernel)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(OSError) as refused:
        (out / "x").write_bytes(b"x")
    assert storage_refusal(refused.value) == "the file system is read-only"


def test_ray_node_timeout_at_startup_is_one_sentence_with_what_to_try():
    from pipeline.ray_connect import RayAddress, _ray_start_sentence

    # Ray's own words (ray/_private/node.py), raised as a bare Exception by ray.init
    ray_says = Exception("The current node timed out during startup. This could happen because some of the "
                         "raylet failed to startup or the GCS has become overloaded.")
    sentence = _ray_start_sentence(RayAddress("local"), ray_says)
    assert sentence.startswith("Ray's node timed out during startup") and "\n" not in sentence
    assert "try again when it is less busy" in sentence and "--ray-address auto" in sentence
    other = _ray_start_sentence(RayAddress("10.0.0.1:6379"), ConnectionError("GCS unreachable\n  at line 2"))
    assert other == ("Cannot start or join the Ray cluster at 10.0.0.1:6379: GCS unreachable at line 2 "
                     "(is it running? try `ray status`).")
