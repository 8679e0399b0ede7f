"""Return freed memory to the system: large decode buffers must not stay in the process after use.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
buffers of tens of MiB come from heap arenas (one per thread) and stay resident when freed: a
server that decoded a few large images in worker threads keeps their peak forever. Fixing the
threshold keeps every large buffer in its own mapping, given back on free; `trim()` hands back
what heap arenas hold free. No-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("seglock.app")

TRIM_ABOVE_BYTES = 4 * 1024 * 1024  # an upload slot that held a buffer this large trims when released
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def tune_malloc(mmap_threshold: int = 32 * 1024 * 1024, arenas: int = 4) -> bool:
    """Large blocks in their own mappings, few arenas; True if applied.

    The threshold is the largest glibc's dynamic one would reach (32 MiB): a decode buffer above it
    is mapped and given back on free, while a forward pass's activations (a few MiB each) keep being
    reused from the heap. A low threshold (256 KiB was tried) maps and faults in every activation
    on every batch: lraspp_mobilenet_v3_large at batch 8 ran 1.5x slower (33 -> 51 ms per image)."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 4 * mmap_threshold) == 1
    ok &= libc.mallopt(_M_ARENA_MAX, arenas) == 1
    if not ok:
        log.warning("malloc tuning not applied")
    return ok


def trim() -> None:
    """Hand back the free memory of every heap arena (malloc_trim); costs a few ms and the pages a
    forward pass would reuse, so only after large buffers."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
