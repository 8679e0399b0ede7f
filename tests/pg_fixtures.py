"""A real, throwaway PostgreSQL server for the tests: initdb + pg_ctl on a temporary folder.

Tests that need it are marked `postgres` and skipped when no `initdb` is installed. The server
refuses to run as root, so under root it runs as the `postgres` user (Debian's package makes one).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _find(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return candidates[-1] if candidates else None


INITDB = _find("initdb")
PG_CTL = _find("pg_ctl")
HAVE_POSTGRES = INITDB is not None and PG_CTL is not None
needs_postgres = [
    pytest.mark.postgres,
    pytest.mark.skipif(not HAVE_POSTGRES, reason="PostgreSQL (initdb, pg_ctl) is not installed"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1:<free port>, trust auth, data in a temporary folder."""

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable  # fsync and synchronous commit on: for tests that crash the server
        self.root = Path(tempfile.mkdtemp(prefix="seglock-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._user = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.root, 0o755)
        self._names = itertools.count()
        self._run([INITDB, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self._user is not None:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c max_connections=300 "
                   "-c shared_buffers=16MB -c fsync=off -c full_page_writes=off -c synchronous_commit=off")
        if self.durable:
            options = options.split(" -c fsync")[0]
        self._run([PG_CTL, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run([PG_CTL, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"], check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends: a crash, not a shutdown."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # the backends notice their parent died and exit
            out = subprocess.run(["pgrep", "-f", "--", str(self.data)], stdout=subprocess.PIPE, text=True)
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            if not alive and not out.stdout.strip():
                break
            time.sleep(0.1)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def create_schema(self) -> str:
        """A fresh, empty schema in the `postgres` database (much cheaper than a database); its URL."""
        import psycopg

        name = f"s{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.url()}?options=-csearch_path%3D{name}"

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    if not HAVE_POSTGRES:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a fresh keystore place (a schema of its own) on the session's PostgreSQL server."""
    return pg_server.create_schema()
