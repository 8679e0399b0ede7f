"""Crash safety: a writer SIGKILLed at random moments leaves a keystore that opens and holds
exactly the state before or after the write it was killed in."""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from seglock.keystore import Keystore

MASTER = base64.b64encode(os.urandom(32)).decode()
ENV = {"SEGLOCK_MASTER_KEY": MASTER}

# Each write adds token w<i>; "ack i" is printed only after write i returned.
WRITER = """
import os, sys
from seglock.keystore import Keystore
ks = Keystore.open(sys.argv[1])
i = int(sys.argv[2])
os.write(1, b"ready\\n")
while True:
    ks.create_token(f"w{i}", ["segment"], ["m0"])
    os.write(1, f"ack {i}\\n".encode())
    i += 1
"""


def seed_keystore(home) -> None:
    """A keystore big enough that a write spends milliseconds in encode, encrypt, fsync and rename."""
    ks = Keystore.open(home, create=True, env=ENV)
    with ks.transaction():
        for i in range(300):
            ks.create_token(f"base{i}", ["segment"], [f"m{i % 5}"])
        for m in range(5):
            ks.add_model_key(f"m{m}", "cp", {"perm": list(range(512))[::-1]})


def written(home) -> int:
    """How many w<i> tokens the keystore holds, checking they are exactly w0..w(n-1)."""
    ks = Keystore.open(home, env=ENV)
    names = {r.name for r in ks.list_tokens()}
    count = sum(1 for name in names if name.startswith("w"))
    assert {f"w{i}" for i in range(count)} <= names, "a write was torn"
    assert len(names) == 300 + count
    return count


def kill_writers(home, kills: int, rng: random.Random) -> int:
    """Start and SIGKILL a writer `kills` times; returns how many kills fell inside a write."""
    env = {**os.environ, **ENV}
    acked = 0
    inside = 0
    for _ in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(home), str(acked)], stdout=subprocess.PIPE, env=env
        )
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.03))
        child.send_signal(signal.SIGKILL)
        out = child.stdout.read().split()
        child.wait()
        assert child.returncode == -signal.SIGKILL
        acks = [int(word) for word in out if word.isdigit()]
        acked = acks[-1] + 1 if acks else acked
        temp_left = any(name.endswith(".tmp") for name in os.listdir(home))
        count = written(home)  # opens cleanly, no torn write
        assert acked <= count <= acked + 1  # the state after the last acked write, or after one more
        inside += temp_left or count == acked + 1
        acked = count
    return inside


def test_writer_killed_50_times_never_leaves_a_broken_keystore(tmp_path):
    home = tmp_path / "home"
    seed_keystore(home)
    inside = kill_writers(home, 55, random.Random(1))
    assert inside >= 1  # some kills landed after a write began and before its ack
    assert written(home) >= 1


@pytest.mark.slow
def test_writer_killed_500_times_never_leaves_a_broken_keystore(tmp_path):
    home = tmp_path / "home"
    seed_keystore(home)
    assert kill_writers(home, 500, random.Random(2)) >= 10
