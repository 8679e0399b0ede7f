"""Crash safety: a writer SIGKILLed at random moments leaves a keystore that opens and holds
exactly the state before or after the write it was killed in (file and PostgreSQL backends)."""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from pg_fixtures import needs_postgres, pg_server, pg_url  # noqa: F401 (fixtures)

from seglock.keystore import Keystore

MASTER = base64.b64encode(os.urandom(32)).decode()


@pytest.fixture(params=["file", pytest.param("postgres", marks=needs_postgres)])
def ENV(request):
    env = {"SEGLOCK_MASTER_KEY": MASTER}
    if request.param == "postgres":
        env["SEGLOCK_KEYSTORE_URL"] = request.getfixturevalue("pg_url")
    return env

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


def seed_keystore(home, ENV) -> None:
    """A keystore big enough that a write spends milliseconds in encode, encrypt, fsync and rename."""
    with Keystore.open(home, create=True, env=ENV) as ks, ks.transaction():
        for i in range(300):
            ks.create_token(f"base{i}", ["segment"], [f"m{i % 5}"])
        for m in range(5):
            ks.add_model_key(f"m{m}", "cp", {"perm": list(range(512))[::-1]})


def written(home, ENV) -> int:
    """How many w<i> tokens the keystore holds, checking they are exactly w0..w(n-1)."""
    with Keystore.open(home, env=ENV) as ks:
        names = {r.name for r in ks.list_tokens()}
    count = sum(1 for name in names if name.startswith("w"))
    assert {f"w{i}" for i in range(count)} <= names, "a write was torn"
    assert len(names) == 300 + count
    return count


def kill_writers(home, kills: int, rng: random.Random, ENV) -> int:
    """Start and SIGKILL a writer `kills` times; returns how many kills fell inside a write."""
    env = {**os.environ, **ENV}
    acked = 0
    inside = 0
    for _ in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(home), str(acked)], stdout=subprocess.PIPE, env=env
        )
        assert child.stdout.readline() == b"ready\n"
        # A database write takes a few round trips more: kill over a longer window to land in some.
        time.sleep(rng.uniform(0.0, 0.03 if "SEGLOCK_KEYSTORE_URL" not in ENV else 0.25))
        child.send_signal(signal.SIGKILL)
        out = child.stdout.read().split()
        child.wait()
        assert child.returncode == -signal.SIGKILL
        acks = [int(word) for word in out if word.isdigit()]
        acked = acks[-1] + 1 if acks else acked
        temp_left = home.is_dir() and any(name.endswith(".tmp") for name in os.listdir(home))
        count = written(home, ENV)  # opens cleanly, no torn write
        assert acked <= count <= acked + 1  # the state after the last acked write, or after one more
        inside += temp_left or count == acked + 1
        acked = count
    return inside


def test_writer_killed_50_times_never_leaves_a_broken_keystore(tmp_path, ENV):
    home = tmp_path / "home"
    seed_keystore(home, ENV)
    inside = kill_writers(home, 55 if "SEGLOCK_KEYSTORE_URL" not in ENV else 20, random.Random(1), ENV)
    if "SEGLOCK_KEYSTORE_URL" not in ENV:  # a database rolls back without a trace to count
        assert inside >= 1  # some kills landed after a write began and before its ack
    assert written(home, ENV) >= 1


@pytest.mark.slow
def test_writer_killed_500_times_never_leaves_a_broken_keystore(tmp_path, ENV):
    home = tmp_path / "home"
    seed_keystore(home, ENV)
    inside = kill_writers(home, 500, random.Random(2), ENV)
    if "SEGLOCK_KEYSTORE_URL" not in ENV:
        assert inside >= 10


# Opens a transaction, makes three changes in it, says so, and waits to be killed before committing.
HOLDER = """
import os, sys, time
from seglock.keystore import Keystore
ks = Keystore.open(sys.argv[1])
with ks.transaction():
    for i in range(3):
        ks.create_token(f"half{i}", ["segment"], ["m0"])
    os.write(1, b"inside\\n")
    time.sleep(600)
"""


def test_a_writer_killed_inside_its_transaction_leaves_nothing_and_frees_the_lock(tmp_path, ENV):
    home = tmp_path / "home"
    seed_keystore(home, ENV)
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(home)], stdout=subprocess.PIPE,
                             env={**os.environ, **ENV})
    assert child.stdout.readline() == b"inside\n"  # it holds the lock (flock, or the row FOR UPDATE)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert written(home, ENV) == 0
    with Keystore.open(home, env=ENV, lock_timeout=10) as ks:
        started = time.monotonic()
        ks.create_token("after", ["segment"], ["m0"])  # the dead writer's lock is gone
        assert time.monotonic() - started < 5
        names = {r.name for r in ks.list_tokens()}
    assert "after" in names and not any(name.startswith("half") for name in names)
