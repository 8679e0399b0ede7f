"""A lean HTTP/1.1 load generator for the speed benchmarks (serve.py, peers.py), in the manner of wrk.

On a small machine the load generator shares the cores with the servers it measures, so what it
spends per request is taken from every server alike. An async httpx client spends about 3 ms of
CPU per multipart request here (building the body and the request, parsing the answer), as much
as a tenth of a 256 px forward pass; this one encodes each request once, writes the same bytes on
`concurrency` keep-alive connections and reads answers by Content-Length (or chunked), a few tens
of microseconds per request. Every server is driven by the same code, so the comparison is fair
and the ratios describe the servers, not the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Request:
    """One HTTP request, encoded once."""

    host: str
    port: int
    data: bytes


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Result:
    elapsed_s: float
    latencies_s: list[float] = field(default_factory=list)
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    opening: int = 0  # requests sent while the connections were opened, before the clock started

    @property
    def answered(self) -> int:
        return len(self.latencies_s)


def multipart(fields: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data upload of `fields` (name -> (filename, bytes))."""
    boundary = os.urandom(16).hex()
    parts = []
    for name, (filename, content) in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(method: str, url: str, *, body: bytes = b"", headers: dict[str, str] | None = None) -> Request:
    """A request to `url` (http://host:port/path), encoded with Content-Length and keep-alive."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http://host[:port]/path URLs, not {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.hostname}:{port}", "Connection: keep-alive",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return Request(parts.hostname, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            chunks.append(chunk[:-2])
        body = b"".join(chunks)
    else:  # the server closes the connection after the body
        body = await reader.read()
        headers["connection"] = "close"
    return Answer(status, headers, body)


class Connection:
    """One keep-alive connection; reopened when the server closes it."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, data: bytes, timeout_s: float) -> Answer:
        if self._streams is not None and self._streams[0].at_eof():
            self.close()  # closed by the server while idle (its keep-alive timeout): open a new one
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        try:
            writer.write(data)
            await writer.drain()
            answer = await asyncio.wait_for(read_answer(reader), timeout_s)
        except BaseException:
            self.close()
            raise
        if answer.headers.get("connection", "").lower() == "close":
            self.close()
        return answer

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def send_once(req: Request, timeout_s: float = 300) -> Answer:
    connection = Connection(req.host, req.port)
    try:
        return await connection.send(req.data, timeout_s)
    finally:
        connection.close()


async def drive(req: Request, concurrency: int, total: int, timeout_s: float = 600,
                on_start: Callable[[], None] | None = None) -> Result:
    """`total` requests on `concurrency` connections, each sending its next request when the last
    one is answered. Answers other than 200 and transport errors are counted as failed, not raised:
    one slow server must not end a comparison.

    The connections are opened one after another before the clock starts, each answered once (not
    counted), as clients arriving over time would: opened all at once, they would wait together in
    the listening socket's queue and a server whose workers share one socket would hand them all
    to whichever worker woke first. `on_start` is called as the clock starts (to take readings the
    measured part begins with)."""
    left = [total]
    result = Result(0.0)
    connections = [Connection(req.host, req.port) for _ in range(concurrency)]
    for connection in connections:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                                 ValueError):
            result.opening += 1
            await connection.send(req.data, timeout_s)

    async def worker(connection: Connection) -> None:
        while left[0] > 0:
            left[0] -= 1
            started = time.perf_counter()
            try:
                answer = await connection.send(req.data, timeout_s)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                result.failed += 1
                continue
            result.statuses[answer.status] = result.statuses.get(answer.status, 0) + 1
            if answer.status != 200:
                result.failed += 1
                continue
            result.latencies_s.append(time.perf_counter() - started)

    if on_start is not None:
        on_start()
    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(connection) for connection in connections))
    finally:
        for connection in connections:
            connection.close()
    result.elapsed_s = time.perf_counter() - started
    return result
