"""Workers listen on sockets of their own (SO_REUSEPORT): connections opened together are spread
over the workers instead of all landing on the first one awake."""

from __future__ import annotations

import pickle
import socket
import time
from pathlib import Path

import psutil
import pytest
from server_fixtures import live_server

from seglock.app import listen
from seglock.app.settings import usable_cores

pytestmark = pytest.mark.skipif(not listen.supported(), reason="no SO_REUSEPORT on this platform")


def test_a_reuse_port_socket_reaches_a_worker_as_a_fresh_socket_on_the_same_address():
    parent = listen.reuse_port_socket("127.0.0.1", 0)
    try:
        port = parent.getsockname()[1]
        assert port != 0  # port 0 became a real port in the parent, before any worker starts
        child = pickle.loads(pickle.dumps(parent))  # what uvicorn's spawn does to the sockets it hands on
        try:
            assert child.fileno() != parent.fileno() and child.getsockname() == ("127.0.0.1", port)
            child.listen(8)
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                accepted, _ = child.accept()
                accepted.close()
        finally:
            child.close()
    finally:
        parent.close()


def test_a_taken_port_is_refused_in_the_parent():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError):
            listen.reuse_port_socket("127.0.0.1", taken.getsockname()[1])


def tcp_of(process: psutil.Process) -> list:
    connections = getattr(process, "net_connections", None) or process.connections  # psutil < 6: connections
    return connections(kind="tcp")


def workers_on(parent: psutil.Process, port: int) -> dict[int, list]:
    """The processes under `parent` listening on `port` (its workers), with their TCP sockets."""
    workers = {}
    for child in parent.children(recursive=True):
        try:
            sockets = [c for c in tcp_of(child) if c.laddr and c.laddr.port == port]
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN for c in sockets):
            workers[child.pid] = sockets
    return workers


def test_connections_opened_together_are_spread_over_the_workers(tmp_path):
    # no OMP_NUM_THREADS and the default --threads 0: the server shares the cores among the workers
    with live_server(tmp_path / "home", "--workers", "2", "--no-demo", threads=None) as server:
        port = int(server["base"].rsplit(":", 1)[1])
        parent = psutil.Process(server["process"].pid)
        deadline = time.monotonic() + 120
        while len(workers_on(parent, port)) < 2:  # the second worker may still be starting
            assert time.monotonic() < deadline, "the second worker never listened"
            time.sleep(0.3)
        connections = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(16)]
        try:
            for conn in connections:  # keep-alive: each stays with the worker that accepted it
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: seglock\r\n\r\n")
            for conn in connections:
                assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            per_worker = {pid: sum(c.status == psutil.CONN_ESTABLISHED for c in sockets)
                          for pid, sockets in workers_on(parent, port).items()}
        finally:
            for conn in connections:
                conn.close()
        share = str(max(1, usable_cores() // 2))
        for pid in per_worker:  # what torch read in each worker as it loaded
            environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                           if item)
            assert environ[b"OMP_NUM_THREADS"] == environ[b"MKL_NUM_THREADS"] == share.encode()
        assert f"2 workers, {share} torch thread(s) each" in server["log"].read_text()
    assert sum(per_worker.values()) == 16 and len(per_worker) == 2
    # each worker logs as the single-process server does: its access lines (16 here) in the server's format
    access = [line for line in server["log"].read_text().splitlines() if " INFO seglock.access: " in line]
    assert sum("GET /healthz 200" in line for line in access) == 16, access
    # by a hash of 16 addresses: one worker gets none with probability 2/65536; one socket shared
    # by both workers (uvicorn's own --workers) put all 16 on one worker here
    assert min(per_worker.values()) >= 1, per_worker
