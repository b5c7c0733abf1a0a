"""Keep the driver's RSS flat over a long run: hand freed memory back to the system now and then.

What the driver allocates per task and per block (Ray's core worker, the Arrow tables of part
records) is freed again, but glibc's allocator keeps freed pages inside its arenas, and the
arenas' holes grow with the run: about 56 bytes of RSS per image at batch 32, while the memory
held stays flat (BENCHMARKS.md, "Driver memory after the bound": with the allocators trimmed
before each sample, RSS falls over the run instead). ``malloc_trim(0)`` returns those pages; it
costs about 2 ms of CPU in a 600 MB driver, so the driver loop calls it every
``RELEASE_EVERY_S`` seconds. Arrow's pool is asked the same (``release_unused``). Where the C
library has no ``malloc_trim`` (macOS, musl) this is a no-op: those allocators return memory
on their own terms.
"""
from __future__ import annotations

import ctypes
import functools
import time
from typing import Callable

RELEASE_EVERY_S = 10.0


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded in this process, its C library's among them
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the pages freed inside this process's allocators to the system.

    True when glibc's ``malloc_trim`` ran (RSS can drop), False where there is none.
    """
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class MemoryReleaser:
    """Calls :func:`release_freed_memory` at most once every ``every_s`` seconds."""

    def __init__(self, every_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = RELEASE_EVERY_S if every_s is None else every_s
        self._clock = clock
        self._last = clock()
        self.releases = 0

    def tick(self) -> None:
        now = self._clock()
        if now - self._last >= self.every_s:
            self._last = now
            release_freed_memory()
            self.releases += 1
