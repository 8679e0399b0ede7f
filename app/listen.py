"""One listening socket per worker process, on the same port (SO_REUSEPORT).

uvicorn's workers share one listening socket, and asyncio accepts every pending connection at once:
keep-alive connections opened together all land on whichever worker woke first and stay there (16
connections from one client: 16 on one worker, the other idle). With SO_REUSEPORT each worker
listens on a socket of its own bound to the same address, and the kernel spreads new connections
over them by a hash of their addresses.

`reuse_port_socket` binds one in the parent (so a taken port fails at once, and port 0 becomes a
real port) without listening on it, so it never takes a connection. uvicorn hands the parent's
sockets to each worker it starts (and restarts) by pickling them: this socket pickles as its
address, and each worker binds a fresh socket of its own there, which uvicorn listens on.
"""

from __future__ import annotations

import socket


def supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


class ReusePortSocket(socket.socket):
    """A socket that a worker process receives as a new socket bound to the same address."""

    def __reduce__(self):
        return _bind, (self.family, self.getsockname())


def _bind(family: int, address: tuple) -> ReusePortSocket:
    sock = ReusePortSocket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def reuse_port_socket(host: str, port: int) -> ReusePortSocket:
    """A socket bound (not listening) to host:port with SO_REUSEPORT; OSError if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _bind(family, (host, port))
