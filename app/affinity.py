"""A core of its own for each worker's forward pass (`--pin-forward`).

With `--workers <cores> --threads 1` each worker runs its forward on one thread, and the event loop,
the decode threads and the other workers' forwards share the same cores. Left to the scheduler, a
forward thread moves between cores and finds its caches filled with someone else's data: at
concurrency 16 on 2 cores the forward took 34.6 ms per image unpinned and 28.7 ms pinned (lraspp,
256 px), 58 against 67 images per second. Where every worker has a core of its own (at least as
many workers as cores), the whole worker runs there: its event loop and decode threads too, so a
request's decode, forward and answer share one core's caches instead of crossing to the other
worker's (request path 5.1 against 5.9 CPU ms per image, 67 against 63 images per second: medians
of 9 interleaved pairs). With fewer workers than cores (`on`), only the forward threads are pinned
and the request threads may use the cores no forward holds.

Cores are claimed with lock files (`<tmp>/seglock-cores-<uid>/core-<n>.lock`, held while the
process lives), so the workers of one server, and the servers of one user on a host, take
different cores; a process that finds every core taken does not pin. `auto` pins only where the
server fills the cores it may use: on CPU, one torch thread per worker, at least as many workers as
cores in its affinity, and no CPU quota on its cgroup. A server using a few cores of a larger host
(a container without a cpuset sees them all, and has a temp folder of its own) is left to the
scheduler: pinned, the containers on one host would all claim the first cores.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
from pathlib import Path

from seglock.app.settings import cpu_quota

log = logging.getLogger("seglock.app")

_claimed: tuple[int, int] | None = None  # (fd, core) held by this process
_lock = threading.Lock()


def claim_core(folder: Path | None = None) -> int | None:
    """A core of this process's affinity no other process of this user holds, held until exit;
    the same core on every call; None if every core is taken or locks cannot be made."""
    global _claimed
    with _lock:
        if _claimed is not None:
            return _claimed[1]
        folder = folder or Path(tempfile.gettempdir()) / f"seglock-cores-{os.getuid()}"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError:
            return None
        for core in sorted(os.sched_getaffinity(0)):
            try:
                fd = os.open(folder / f"core-{core}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            _claimed = (fd, core)
            return core
        return None


def forward_core(mode: str, device_type: str, threads: int, workers: int) -> int | None:
    """The core this process's forward threads are pinned to, or None (`mode`: auto | on | off).
    With at least as many `workers` as cores, every thread of the process is pinned there too."""
    if mode == "off" or device_type != "cpu" or not hasattr(os, "sched_setaffinity"):
        return None
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        return None  # one core: nothing to choose
    if mode == "auto" and (threads != 1 or workers < cores or cpu_quota() is not None):
        return None
    core = claim_core()
    if core is None:
        return None
    if workers >= cores:  # a core per worker: the whole worker on its own
        pin_process(core)
        log.info("this worker (pid %d) runs on core %d", os.getpid(), core)
    else:
        log.info("forward passes of this worker (pid %d) run on core %d", os.getpid(), core)
    return core


def pin_this_thread(core: int) -> None:
    """Run the calling thread on `core` only (Linux: a thread's id is a valid pid here)."""
    _pin([threading.get_native_id()], core)


def pin_process(core: int) -> None:
    """Run every thread of this process on `core` only; threads started later inherit it (Linux)."""
    _pin([int(tid) for tid in os.listdir("/proc/self/task")], core)


def _pin(threads: list[int], core: int) -> None:
    for tid in threads:
        try:
            os.sched_setaffinity(tid, {core})
        except ProcessLookupError:
            pass  # the thread ended meanwhile
        except OSError as exc:
            log.warning("could not pin to core %d: %s", core, exc)
            return
