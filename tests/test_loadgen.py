"""benchmarks/loadgen.py against a real uvicorn server: answers read whole, and a keep-alive
connection the server closed while it sat idle is opened again rather than counted as failed."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loadgen  # noqa: E402

KEEP_ALIVE_S = 1
ANSWERED: list[str] = []  # the path of every request the server answered, in order


async def echo_length(scope, receive, send):
    """200 with the request body's length as the answer's body."""
    assert scope["type"] == "http"
    ANSWERED.append(scope["path"])
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server():
    config = uvicorn.Config(echo_length, host="127.0.0.1", port=0, timeout_keep_alive=KEEP_ALIVE_S,
                            log_level="warning", lifespan="off")
    live = uvicorn.Server(config)
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not live.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = live.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    live.should_exit = True
    thread.join(10)


def test_a_connection_closed_by_the_servers_keep_alive_timeout_is_opened_again(server):
    req = loadgen.request("POST", f"{server}/x", body=b"z" * 1000)

    async def main():
        connection = loadgen.Connection(req.host, req.port)
        try:
            first = await connection.send(req.data, 10)
            await asyncio.sleep(KEEP_ALIVE_S + 1)  # uvicorn closes the idle connection meanwhile
            second = await connection.send(req.data, 10)
        finally:
            connection.close()
        return first, second

    first, second = asyncio.run(main())
    assert (first.status, first.body) == (200, b"1000")
    assert (second.status, second.body) == (200, b"1000")


def test_drive_counts_every_request_it_was_asked_for(server):
    body, content_type = loadgen.multipart({"image": ("x.png", b"\x89PNG" + bytes(range(256)) * 40)})
    req = loadgen.request("POST", f"{server}/y", body=body, headers={"Content-Type": content_type})
    result = asyncio.run(loadgen.drive(req, 4, 20))
    assert (result.failed, result.answered, result.opening) == (0, 20, 4)
    assert result.statuses == {200: 20}


def test_on_start_is_called_once_after_the_connections_are_opened_and_before_any_timed_request(server):
    req = loadgen.request("POST", f"{server}/timed", body=b"z" * 100)
    seen_at_start: list[int] = []
    before = ANSWERED.count("/timed")
    result = asyncio.run(loadgen.drive(req, 3, 12, on_start=lambda: seen_at_start.append(ANSWERED.count("/timed"))))
    assert (result.failed, result.answered, result.opening) == (0, 12, 3)
    assert seen_at_start == [before + 3]  # the three opening requests, none of the twelve timed
    assert ANSWERED.count("/timed") == before + 15
