"""A storage hiccup is not a bad image: tell the world's faults from the input's, retry the first.

*Transient* faults are the world's: connection refused or reset, timeouts,
throttling, 5xx answers. They are retried with exponential backoff (around
fsspec's and botocore's own retries) until a deadline; if they persist, a row
that could not be read gets the error kind ``storage unavailable``, which the
writer never commits: its shard stays uncommitted and the next run redoes it.
*Full-disk* faults (no space, quota, read-only, permission denied) are neither:
the run stops with one sentence. Everything else about an input (missing,
undecodable, truncated) is the image's fault: an error row, committed, final.
"""
from __future__ import annotations

import errno
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from pipeline.data.readers import RawImage, read_one, read_source, shard_error_id
from pipeline.data.sources import open_fs

T = TypeVar("T")

# The error kind of a row whose bytes could not be read because storage was unreachable.
UNAVAILABLE = "storage unavailable"

# Exception class names (anywhere in the MRO) that mean "the connection or the service failed".
_TRANSIENT_CLASS_NAMES = frozenset({
    "ConnectionError",  # builtins (refused, reset, aborted, broken pipe) and botocore's (endpoint, proxy)
    "TimeoutError", "Timeout", "FSTimeoutError",  # builtins/asyncio, requests/urllib3, fsspec
    "HTTPClientError", "IncompleteReadError", "ResponseStreamingError",  # botocore
    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError",  # aiohttp
    "RemoteDisconnected", "IncompleteRead",  # http.client
})
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EBUSY",  # s3fs: SlowDown, 503
        "EREMOTEIO",  # s3fs: InternalError, 500
        "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN",
        "EHOSTDOWN", "EAGAIN", "EPIPE",
    ) if hasattr(errno, name)
)
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "TooManyRequestsException",
    "RequestLimitExceeded", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
    "500", "502", "503", "504",
})
# Storage that refuses to take more: nothing a retry or a rerun can fix without the user.
_FULL_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
if hasattr(errno, "EDQUOT"):
    _FULL_ERRNOS[errno.EDQUOT] = "the disk quota is exceeded"


@dataclass(frozen=True)
class RetryPolicy:
    """How long a storage operation keeps retrying transient faults (exponential backoff with jitter)."""

    deadline_s: float = 120.0
    first_wait_s: float = 0.5
    max_wait_s: float = 15.0

    def waits(self) -> Iterator[float]:
        """Waits before each retry, until the deadline is spent.

        A circuit breaker per process: once an operation has spent a whole deadline in
        vain, operations for the next ``deadline_s`` seconds get one attempt each, so a
        storage that stays down ends the run in minutes instead of a deadline per shard;
        the first success closes the breaker again.
        """
        if time.monotonic() < _breaker["open_until"]:
            return
        end = time.monotonic() + self.deadline_s
        wait = self.first_wait_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                _breaker["open_until"] = time.monotonic() + self.deadline_s
                return
            yield min(left, wait * (0.5 + random.random()))
            wait = min(wait * 2, self.max_wait_s)


_breaker = {"open_until": float("-inf")}


def storage_recovered() -> None:
    """An operation succeeded: close the circuit breaker."""
    _breaker["open_until"] = float("-inf")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is the world's fault: worth retrying, never an error row."""
    for e in _chain(exc):
        if isinstance(e, FileNotFoundError):
            return False
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(e, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            err = response.get("Error", {}) or {}
            status = (response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
            if str(err.get("Code")) in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
                return True
        code = getattr(e, "code", None)  # gcsfs HttpError
        if isinstance(code, int) and (code >= 500 or code == 429) and "HttpError" in type(e).__name__:
            return True
    return False


def storage_refusal(exc: BaseException) -> str | None:
    """What is wrong when storage refuses a write (full, read-only, no permission), else None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return _FULL_ERRNOS[e.errno]
    return None


def describe(exc: BaseException, limit: int = 300) -> str:
    """``TypeName: message`` on one line, shortened."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def call_with_retries(fn: Callable[..., T], *args: Any, policy: RetryPolicy, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried on transient faults until the policy's deadline; re-raises the last."""
    waits = policy.waits()
    failed = False
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            failed = True
            wait = next(waits, None)
            if wait is None:
                raise
            time.sleep(wait)
            continue
        if failed or _breaker["open_until"] > float("-inf"):
            storage_recovered()
        return result


# ----------------------------------------------------------------------------- reads


def resilient_read(
    kind: str,
    paths: list[str],
    root: str,
    storage_options: dict[str, Any] | None,
    image_column: str | None = None,
    policy: RetryPolicy | None = None,
    only: Iterable[str] | None = None,
) -> Iterator[Any]:
    """``readers.read_source``, with the world's faults retried and never turned into a bad-image row.

    Image files: a row whose read failed is read again on its own; a transient fault is
    retried until the deadline, then the row (and every later row of the shard, unread)
    becomes ``storage unavailable``. Tar and Parquet shards: a transient fault restarts
    the read and skips the rows already yielded (the order is deterministic); when the
    deadline passes, one ``storage unavailable`` row ends the shard. ``only``: yield just
    these image ids (``diffseg label --retry-errors``).
    """
    policy = policy or RetryPolicy()
    wanted = set(only) if only is not None else None
    if kind == "images":
        rows: Iterator[RawImage] = _read_images(paths, root, storage_options, policy)
    else:
        rows = _read_container(kind, paths, root, storage_options, image_column, policy)
    for raw in rows:
        if wanted is None or raw.image_id in wanted or raw.error is not None and raw.error.startswith(UNAVAILABLE):
            yield raw


def _read_images(paths: list[str], root: str, storage_options: dict[str, Any] | None, policy: RetryPolicy):
    fs = None
    unavailable: str | None = None  # once the deadline is spent, the shard is redone anyway: stop reading
    done = 0
    for raw in read_source("images", paths, root, storage_options):
        done += 1
        if unavailable is not None:
            yield RawImage(raw.image_id, raw.source, None, unavailable)
            continue
        if raw.error is not None and raw.error.startswith("read error:"):
            fs = fs or open_fs(raw.source, storage_options)[0]
            try:
                data = call_with_retries(read_one, fs, fs._strip_protocol(raw.source), policy=policy)
                raw = RawImage(raw.image_id, raw.source, bytes(data))
            except Exception as exc:  # noqa: BLE001
                if is_transient(exc):
                    unavailable = f"{UNAVAILABLE}: {describe(exc)} (retried for {policy.deadline_s:g} s)"
                    raw = RawImage(raw.image_id, raw.source, None, unavailable)
                else:
                    raw = RawImage(raw.image_id, raw.source, None, f"read error: {describe(exc)}")
        yield raw


def _read_container(
    kind: str, paths: list[str], root: str, storage_options: dict[str, Any] | None, image_column: str | None,
    policy: RetryPolicy,
):
    waits = policy.waits()
    yielded = 0
    while True:
        already = yielded  # rows a failed attempt yielded: skipped on this one (the order is deterministic)
        try:
            for position, raw in enumerate(read_source(kind, paths, root, storage_options, image_column)):
                if position < already:
                    continue
                yielded += 1
                yield raw
            storage_recovered()
            return
        except Exception as exc:  # noqa: BLE001
            if not is_transient(exc):
                raise
            wait = next(waits, None)
            if wait is None:
                yield RawImage(shard_error_id(kind, paths[0], root), paths[0], None,
                               f"{UNAVAILABLE}: {describe(exc)} (retried for {policy.deadline_s:g} s)")
                return
            time.sleep(wait)
