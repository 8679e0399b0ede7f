"""Each worker's forward thread on a core of its own: cores claimed by lock files, one per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from seglock.app import affinity

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no thread affinity here")

HOLDER = """
import sys
from pathlib import Path
from seglock.app import affinity
print(affinity.claim_core(Path(sys.argv[1])), flush=True)
sys.stdin.readline()  # holds the core until told to go
"""


def test_processes_claim_different_cores_and_one_too_many_gets_none(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 8:
        pytest.skip("one holder process per core: too many here")
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for _ in range(len(cores) + 1)]
    try:
        claimed = []
        for holder in holders:  # one by one: each answers once it holds its core (or found none)
            claimed.append(holder.stdout.readline().strip())
    finally:
        for holder in holders:
            holder.stdin.close()
            holder.wait(30)
    assert sorted(claimed) == sorted([str(core) for core in cores] + ["None"])
    # a core whose holder exited is free again
    again = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], input="\n", capture_output=True, text=True)
    assert again.stdout.strip() == str(cores[0])


def test_auto_pins_only_a_server_that_fills_its_cores_with_one_thread_forwards():
    cores = len(os.sched_getaffinity(0))
    assert affinity.forward_core("off", "cpu", 1, cores) is None
    assert affinity.forward_core("auto", "cuda", 1, cores) is None
    assert affinity.forward_core("auto", "cpu", 4, cores) is None  # an OpenMP team is left to the scheduler
    assert affinity.forward_core("auto", "cpu", 1, cores - 1) is None  # a few cores of a larger machine
    assert affinity.forward_core("on", "mps", 1, cores) is None


def test_a_pinned_thread_runs_on_its_core_only_and_the_others_do_not_follow():
    core = sorted(os.sched_getaffinity(0))[-1]
    before = os.sched_getaffinity(0)
    seen = {}

    def pinned():
        affinity.pin_this_thread(core)
        seen["thread"] = os.sched_getaffinity(threading.get_native_id())

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    assert seen["thread"] == {core}
    assert os.sched_getaffinity(0) == before  # the calling thread (the event loop's) is not pinned


WORKER = """
import json, os, sys, threading
from pathlib import Path
from seglock.app import affinity
cores = len(os.sched_getaffinity(0))
release = threading.Event()
waiting = threading.Thread(target=release.wait)  # a thread started before the claim
waiting.start()
core = affinity.claim_core(Path(sys.argv[1]))  # in the test's folder: a running server's claims do not count
before = sorted(os.sched_getaffinity(0))
assert affinity.forward_core("on", "cpu", 1, cores * int(sys.argv[2])) == core
seen = {}
later = threading.Thread(target=lambda: seen.update(later=sorted(os.sched_getaffinity(threading.get_native_id()))))
later.start()
later.join()
print(json.dumps({"core": core, "before": before, "main": sorted(os.sched_getaffinity(0)),
                  "earlier": sorted(os.sched_getaffinity(waiting.native_id)), "later": seen["later"]}))
release.set()
"""


def run_worker(folder, workers_per_core: int) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, str(folder), str(workers_per_core)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_a_worker_with_a_core_of_its_own_runs_every_thread_there(tmp_path):
    seen = run_worker(tmp_path, 1)  # as many workers as cores
    assert seen["before"] == sorted(os.sched_getaffinity(0))
    # the event loop's thread, one that was running already and one started afterwards
    assert seen["main"] == seen["earlier"] == seen["later"] == [seen["core"]]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_fewer_workers_than_cores_pin_only_the_forward_thread(tmp_path):
    seen = run_worker(tmp_path, 0)  # `on` with 0 workers per core: fewer workers than cores
    assert seen["main"] == seen["earlier"] == seen["later"] == seen["before"]
