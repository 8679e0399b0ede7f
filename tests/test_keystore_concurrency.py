"""Concurrent writers in separate processes never lose each other's changes (file and PostgreSQL)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

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

# Waits for "go" on stdin so both writers start together, then makes 100 tokens, one write each.
WRITER = """
import sys
from seglock.keystore import Keystore
ks = Keystore.open(sys.argv[1])
prefix = sys.argv[2]
print("ready", flush=True)
assert sys.stdin.readline() == "go\\n"
for i in range(100):
    ks.create_token(f"{prefix}{i}", ["segment"], ["m"])
ks.add_model_key("m-" + prefix, "cp", {"perm": [1, 0]})
"""


def test_two_processes_creating_100_tokens_each_end_with_all_200(tmp_path, ENV):
    home = tmp_path / "home"
    Keystore.open(home, create=True, env=ENV).close()
    env = {**os.environ, **ENV}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(home), prefix],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )
        for prefix in ("a", "b")
    ]
    for writer in writers:
        assert writer.stdout.readline() == "ready\n"
    for writer in writers:
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    ks = Keystore.open(home, env=ENV)
    names = {r.name for r in ks.list_tokens()}
    assert names == {f"{p}{i}" for p in "ab" for i in range(100)}
    assert ks.models() == ["m-a", "m-b"]
    assert ks.generation == 1 + 202  # creation, then every write of both processes
    assert sum(e.action == "token.create" for e in ks.audit_log()) == 200
    ks.close()
