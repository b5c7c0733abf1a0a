"""One output, one writer: a lease object ``_lease.json`` at the output root.

A run takes the lease before it touches anything (before Ray starts), renews it
(a heartbeat) while it works, and deletes it when it ends. The lease holds the
run's id, host, process id and the time of its last heartbeat. Another run
finding a live lease stops with one sentence; a lease is dead (and taken over)
when its heartbeat is older than ``stale_after_s`` or more than ``stale_after_s`` in
the future (clock skew: a holder's clock that far off looks dead either way, so a
dead lease is never waited on past twice that), or at once when it was taken
on this host by a process that no longer exists (a killed run, rerun right away).

Taking it is atomic where the storage allows: a local file is created with
``link()`` (fails if the name exists), an S3 object with a conditional PUT
(``If-None-Match: *``), and a dead lease is replaced with ``If-Match`` on its
ETag (S3) or by renaming it away first (local), so two runs never both win.
Other object stores get a write followed by a read-back check.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.data.retry import describe
from pipeline.data.schema import LEASE
from pipeline.data.storage import is_local

logger = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
_HELD_HERE: set[str] = set()  # run ids of leases this process holds now (label() may run many times)


class LeaseHeldError(RuntimeError):
    """Another live run holds the output. The message is one sentence."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid apart), None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"


@dataclass
class Lease:
    """A lease this process holds; ``lost`` turns true if another run took it over."""

    fs: fsspec.AbstractFileSystem
    path: str
    body: dict[str, Any]
    etag: str | None = None
    heartbeat_s: float = HEARTBEAT_S
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        _HELD_HERE.add(self.run_id)

    @property
    def run_id(self) -> str:
        return self.body["run_id"]

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="diffseg-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - storage hiccup: the next beat tries again
                logger.debug("lease heartbeat failed: %s", describe(exc))

    def renew(self) -> None:
        """Write a fresh heartbeat, unless another run has taken the lease."""
        current, etag = _read(self.fs, self.path)
        if current is None or current.get("run_id") != self.run_id:
            self.lost = True
            self._stop.set()
            return
        self.body["heartbeat_at"] = time.time()
        self.etag = _overwrite(self.fs, self.path, self.body, etag)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease (if it is still ours)."""
        self._stop.set()
        _HELD_HERE.discard(self.run_id)
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current, _ = _read(self.fs, self.path)
            if current is not None and current.get("run_id") == self.run_id:
                self.fs.rm_file(self.path)
        except Exception as exc:  # noqa: BLE001 - a lease left behind goes stale by itself
            logger.warning("could not remove the output's lease %s: %s", self.path, describe(exc))


def acquire(
    fs: fsspec.AbstractFileSystem,
    root: str,
    output: str,
    *,
    stale_after_s: float = STALE_AFTER_S,
    heartbeat_s: float = HEARTBEAT_S,
    name: str = LEASE,
) -> Lease:
    """Take the output's lease (``name``: one per part of a ``--part`` run) or raise
    LeaseHeldError (one sentence naming the holder)."""
    path = f"{root.rstrip('/')}/{name}"
    body = {
        "run_id": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "started_at": time.time(),
        "heartbeat_at": time.time(),
    }
    for _ in range(5):
        etag = _create(fs, path, body)
        if etag is not False:
            return Lease(fs, path, body, etag if isinstance(etag, str) else None, heartbeat_s)
        current, current_etag = _read(fs, path)
        if current is None:
            continue  # released between our two calls: try again
        reason = _dead(current, stale_after_s)
        if reason is None:
            age = time.time() - float(current.get("heartbeat_at", 0))
            when = f"{age:.0f} s ago" if age >= 0 else f"{-age:.0f} s in the future by this host's clock"
            raise LeaseHeldError(
                f"{output} is being written by another diffseg run (run {str(current.get('run_id'))[:8]} on "
                f"{current.get('host')}, pid {current.get('pid')}, last heartbeat {when}); wait for it "
                f"to finish, or if that run is dead, rerun after {stale_after_s:.0f} s or delete {path}."
            )
        logger.warning("taking over the lease of %s: the run that held it %s", output, reason)
        if _take_over(fs, path, body, current, current_etag):
            return Lease(fs, path, body, None, heartbeat_s)
    raise LeaseHeldError(f"{output}: could not take its lease {path} (other runs keep taking it); try again.")


def holder(fs: fsspec.AbstractFileSystem, path: str, stale_after_s: float = STALE_AFTER_S) -> dict[str, Any] | None:
    """The body of the live lease at ``path``, None when there is none or its run is dead."""
    current, _ = _read(fs, path)
    if current is None or _dead(current, stale_after_s) is not None:
        return None
    return current


def _dead(lease: dict[str, Any], stale_after_s: float) -> str | None:
    """Why a lease's holder is gone, or None while it may be alive."""
    try:
        age = time.time() - float(lease.get("heartbeat_at", 0))
    except (TypeError, ValueError):
        return "left an unreadable lease"
    if age > stale_after_s:
        return f"stopped renewing it {age:.0f} s ago"
    if age < -stale_after_s:  # a live holder's heartbeat is never ahead of its own clock
        return f"left a heartbeat {-age:.0f} s in the future (clock skew past {stale_after_s:.0f} s)"
    if lease.get("host") == socket.gethostname() and lease.get("pid") == os.getpid():
        if lease.get("run_id") not in _HELD_HERE:
            return "(an earlier run in this process) has ended"
        return None
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        start = _process_start(lease["pid"])
        if start is None or (lease.get("pid_start") not in (None, "?") and start not in ("?", lease["pid_start"])):
            return f"(pid {lease['pid']} on this host) no longer runs"
    return None


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True).encode()


def _precondition_failed(exc: BaseException) -> bool:
    """An S3 conditional PUT lost (412 PreconditionFailed; s3fs raises FileExistsError for If-None-Match)."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, FileExistsError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        e = e.__cause__ or e.__context__
    return False


def _read(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict[str, Any] | None, str | None]:
    """(lease body, ETag on object stores) or (None, None) when there is no lease."""
    fs.invalidate_cache(path)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    etag = None
    if not is_local(fs):
        try:
            etag = fs.info(path).get("ETag")
        except FileNotFoundError:
            return None, None
    try:
        body = json.loads(data)
        return (body if isinstance(body, dict) else {"heartbeat_at": 0}), etag
    except (UnicodeDecodeError, json.JSONDecodeError):
        # Half-written by a writer without atomic create, or damaged: judge it by its age.
        try:
            mtime = fs.modified(path).timestamp()
        except Exception:  # noqa: BLE001
            mtime = 0.0
        return {"heartbeat_at": mtime, "run_id": None, "host": "?", "pid": None}, etag


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocols or "s3a" in protocols


def _create(fs: fsspec.AbstractFileSystem, path: str, body: dict[str, Any]) -> str | bool:
    """Create the lease if no lease exists: True/ETag on success, False when one exists."""
    data = _encode(body)
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{os.path.basename(path)}.{body['run_id'][:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # atomic: fails when the name exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if _is_s3(fs):
        try:
            out = fs.pipe_file(path, data, mode="create")  # If-None-Match: *
        except (FileExistsError, OSError) as exc:
            if _precondition_failed(exc):
                return False
            raise
        return (out or {}).get("ETag") or True
    if fs.exists(path):  # no conditional write here: write, then check that ours is what is there
        return False
    fs.pipe_file(path, data)
    time.sleep(0.5)
    current, _ = _read(fs, path)
    return True if current and current.get("run_id") == body["run_id"] else False


def _overwrite(fs: fsspec.AbstractFileSystem, path: str, body: dict[str, Any], etag: str | None) -> str | None:
    data = _encode(body)
    if is_local(fs):
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{body['run_id'][:8]}.beat"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return None
    if _is_s3(fs) and etag:
        out = fs.pipe_file(path, data, IfMatch=etag)
        return (out or {}).get("ETag")
    fs.pipe_file(path, data)
    return None


def _take_over(
    fs: fsspec.AbstractFileSystem, path: str, body: dict[str, Any], dead: dict[str, Any], etag: str | None
) -> bool:
    """Replace a dead lease with ours; False when another run replaced it first."""
    if is_local(fs):
        aside = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{body['run_id'][:8]}.dead"
        try:
            os.rename(path, aside)  # only one taker can move the dead lease away
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read())
        except (OSError, ValueError):
            moved = {}
        if dead.get("run_id") is not None and (
            not isinstance(moved, dict) or (moved.get("run_id"), moved.get("heartbeat_at")) != (
                dead.get("run_id"), dead.get("heartbeat_at"))
        ):
            # Another taker replaced the dead lease between our read and our rename: put theirs back.
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return _create(fs, path, body) is not False
    if _is_s3(fs) and etag:
        try:
            fs.pipe_file(path, _encode(body), IfMatch=etag)
            return True
        except (FileExistsError, OSError) as exc:
            if _precondition_failed(exc):
                return False
            raise
    fs.rm_file(path)
    return _create(fs, path, body) is not False
