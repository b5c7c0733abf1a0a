"""The data path at cluster scale, on one machine: workers write, the driver gets records only,
a model actor killed mid-run is restarted and the output is still exactly once."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import label
from pipeline_helpers import FAST, make_photo_folder, read_output

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _carries_labels(obj, depth: int = 0) -> bool:
    """True when a deserialized object is (or holds) label rows: a label_map column or PNG bytes."""
    if depth > 3:
        return False
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        return "label_map" in obj.schema.names
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj[:8]) == PNG_SIGNATURE
    if isinstance(obj, dict):
        return "label_map" in obj or any(_carries_labels(v, depth + 1) for v in list(obj.values())[:64])
    if isinstance(obj, (list, tuple)):
        return any(_carries_labels(v, depth + 1) for v in obj[:64])
    columns = getattr(obj, "columns", None)  # a pandas block
    return columns is not None and "label_map" in list(columns)


@pytest.fixture
def driver_deserializations(ray_session, monkeypatch):
    """Every object this (driver) process deserializes from Ray, checked for label rows."""
    from ray._private.serialization import SerializationContext

    original = SerializationContext.deserialize_objects
    seen = {"objects": 0, "with_labels": 0}

    def watched(self, *args, **kwargs):
        results = original(self, *args, **kwargs)
        for obj in results:
            seen["objects"] += 1
            if _carries_labels(obj):
                seen["with_labels"] += 1
        return results

    monkeypatch.setattr(SerializationContext, "deserialize_objects", watched)
    return seen


def test_the_driver_never_receives_label_bytes(ray_session, driver_deserializations, tmp_path):
    ray = ray_session
    # The watch works: a label row fetched by this process is seen.
    assert ray.get(ray.put(pa.table({"label_map": [PNG_SIGNATURE + b"..."]}))).num_rows == 1
    assert driver_deserializations["with_labels"] == 1
    driver_deserializations.update(objects=0, with_labels=0)

    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=3)
    summary = label(str(src), str(out), rows_per_file=2, **FAST)
    assert summary["complete"] and summary["labelled"] == len(ids)
    table = read_output(str(out))
    assert sorted(table.column("image_id").to_pylist()) == ids
    assert all(m.startswith(PNG_SIGNATURE) for m in table.column("label_map").to_pylist())
    assert driver_deserializations["objects"] > 0  # the part records did come through here
    assert driver_deserializations["with_labels"] == 0


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _actor_table() -> dict:
    """The GCS's actor records (id -> class, state, restarts), dead ones included."""
    import ray

    return ray._private.state.actors()  # the public state API needs the dashboard, which tests leave off


def label_actor_pids(root_pid: int) -> set[int]:
    """Model actor processes under ``root_pid`` (this test's own Ray), by their process title."""
    pids = set()
    for pid in _descendants(root_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::") and b"LabelActor" in cmdline:
            pids.add(pid)
    return pids


def _released_by_the_pool(record: dict) -> bool:
    """Whether an actor ended because its pool let it go (its handle was dropped: its work was
    done), not because it was killed."""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    reasons = ActorDiedErrorContext.Reason
    return record["DeathCause"].actor_died_error_context.reason in (reasons.REF_DELETED, reasons.OUT_OF_SCOPE)


def _label_and_kill_the_model_actor(src: Path, out: Path) -> dict:
    """Label ``src`` into ``out`` with one model actor, SIGKILL it once it has labelled its first
    batch, and report what happened: the run's result, the kill, the actor processes seen after
    it and the GCS records of this run's actors."""
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = label(str(src), str(out), rows_per_file=2, actors=1, **{**FAST, "batch_size": 1})
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            result["error"] = exc

    actors_before = set(_actor_table())
    driver = threading.Thread(target=run)
    driver.start()
    killed, committed_at_kill = None, None
    deadline = time.monotonic() + 300
    try:
        while driver.is_alive() and time.monotonic() < deadline and killed is None:
            actors = label_actor_pids(os.getpid())
            # the model has labelled its first batch (a spill part exists): most of its work is still ahead
            if actors and (out / "_inprogress").exists() and any((out / "_inprogress").rglob("*.arrow")):
                killed = min(actors)
                committed_at_kill = len(list((out / "_done").glob("*.json")))
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        restarted = set()
        while driver.is_alive() and time.monotonic() < deadline:
            restarted |= label_actor_pids(os.getpid()) - {killed}
            time.sleep(0.1)
    finally:
        driver.join(timeout=max(1.0, deadline - time.monotonic()))
    # this run's model actors (Ray Data's own detached actors, created by a session's first dataset, are not)
    ours = [a for key, a in _actor_table().items() if key not in actors_before and "LabelActor" in a["ActorClassName"]]
    late = any(a["Pid"] == killed and _released_by_the_pool(a) for a in ours)
    return {"result": result, "killed": killed, "committed_at_kill": committed_at_kill, "restarted": restarted,
            "actors": ours, "kill_came_late": late or committed_at_kill == 24}


@pytest.mark.slow
def test_a_killed_model_actor_is_restarted_and_every_image_is_there_once(ray_session, tmp_path):
    src = tmp_path / "in"
    ids = make_photo_folder(src, copies=16)  # 48 images, 24 shards
    # On a loaded machine the actor can finish all 48 images before the first spill part is
    # written, and the kill then lands on an actor its pool has already let go: nothing was tested,
    # so that case (and only that one) is run again, into a fresh output.
    for attempt in range(3):
        out = tmp_path / f"out-{attempt}"
        seen = _label_and_kill_the_model_actor(src, out)
        if seen["killed"] is None or not seen["kill_came_late"]:
            break
    result = seen["result"]
    assert seen["killed"] is not None, f"the run ended before its model actor could be killed: {result}"
    assert not seen["kill_came_late"], f"3 tries, and each kill came after the model's work was done: {seen}"
    assert "error" not in result, result.get("error")
    assert "summary" in result, f"the run did not end within 300 s of its start: {seen}"
    summary = result["summary"]
    assert summary["complete"] and summary["images"] == len(ids) and summary["labelled"] == len(ids)
    got = read_output(str(out)).column("image_id").to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == ids
    # a new process took over: seen directly, or in the GCS's actor table (a restart can come
    # and go between two polls on a loaded machine): the actor restarted or was replaced
    ours = seen["actors"]
    took_over = any(a.get("NumRestarts", 0) >= 1 for a in ours) or len(ours) >= 2
    assert seen["restarted"] or took_over, f"no new model actor process took over: {ours}"
