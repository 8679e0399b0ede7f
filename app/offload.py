"""Work a request does besides waiting (decoding, model inputs, answers): in a thread, or where it is.

A route hands CPU work to a thread so the event loop stays free for other connections meanwhile. On
a worker confined to one core (`--workers` as many as the cores with `--threads 1`:
`seglock.app.affinity` pins each to its own) that thread runs on the loop's own core, beside the
forward: it buys no parallelism, and each hop costs two context switches and two wake-ups. Run in
place, /v2's three hops took its request path from 0.486 to 0.412 CPU ms (in-process on one core),
and a live 2-core server (256 px lraspp, concurrency 16) answered 2 % more images a second. So small
work (up to `INLINE_MAX_BYTES` of pixels: a few milliseconds at most, within the interpreter's 5 ms
thread switch interval) runs in place there; larger work, and everything on a worker with more than
one core, goes to a thread.
"""

from __future__ import annotations

import os
from asyncio import to_thread
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

INLINE_MAX_BYTES = 1 << 20  # 1 MiB of pixels: a 590 px RGB image, whose PNG decodes in 4-5 ms here


def one_core() -> bool:
    """Whether the calling thread (and the threads it starts) can run on one core only."""
    return hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) == 1


async def run_off_loop(nbytes: int | None, fn: Callable[..., T], /, *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` for work on `nbytes` bytes of pixels (None: unknown): in place on a
    one-core worker when that is at most `INLINE_MAX_BYTES`, else in a thread."""
    if nbytes is not None and nbytes <= INLINE_MAX_BYTES and one_core():
        return fn(*args, **kwargs)
    return await to_thread(fn, *args, **kwargs)
