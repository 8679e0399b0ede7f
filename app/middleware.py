"""ASGI middleware: request ids, the access log, metrics, and the body-size limit.

Written as plain ASGI so a too-large body is refused while it streams in, before any
handler or multipart parser holds it in memory.
"""

from __future__ import annotations

import json
import secrets
import time

from starlette.exceptions import HTTPException

from seglock.app.observability import Metrics, access_log
from seglock.keystore.audit import scrub

# Routes that take an image upload; every other route's body is small JSON (or none) and gets the
# small limit, so nothing parses megabytes before authenticating.
UPLOAD_SUFFIXES = ("/segment", "/infer", "/thief-view")

REQUEST_ID_HEADER = b"x-request-id"


class BodyTooLarge(HTTPException):
    """Raised from `receive` while the body streams in; an HTTPException so that body
    parsers re-raise it as is and the error handler answers 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class RequestMiddleware:
    """Tags each request with an id, limits its body, logs it once, and counts it."""

    def __init__(self, app, *, metrics: Metrics, max_body_bytes: int, max_small_body_bytes: int | None = None):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_small_body_bytes = max_small_body_bytes or max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500, "sent": False}
        path = scope.get("path", "")
        limit = self.max_body_bytes if path.endswith(UPLOAD_SUFFIXES) else min(self.max_small_body_bytes,
                                                                                self.max_body_bytes)

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_json(send, 413, "too_large",
                             f"request body is {declared} bytes; the limit is {limit}", request_id)
            self._finish(scope, 413, started, request_id)
            return

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["sent"] = True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, limited_receive, tagged_send)
        except BodyTooLarge:
            if not status_holder["sent"]:
                await _send_json(send, 413, "too_large", f"request body exceeds the limit of {limit} bytes",
                                 request_id)
                status_holder["status"] = 413
        self._finish(scope, status_holder["status"], started, request_id)

    def _finish(self, scope, status: int, started: float, request_id: str) -> None:
        elapsed = time.perf_counter() - started
        route = _route_template(scope)
        method = scope.get("method", "-")
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(method, route).observe(elapsed)
        # the path is logged (a token pasted into it cut to its id, control characters escaped so no
        # line can be forged); the query string and headers (tokens) never are
        access_log.info("%s %s %s %d %.1fms", request_id, method, log_safe_path(scope.get("path", "-")), status,
                        elapsed * 1000)


def log_safe_path(path: str, limit: int = 300) -> str:
    text = scrub(path[:limit])
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() or not text.isascii() else text


def _route_template(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _incoming_request_id(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            # only short, plain ids are echoed back: nothing a client sends reaches a log verbatim
            if 0 < len(text) <= 64 and all(c.isalnum() or c in "-_." for c in text):
                return text
    return None


async def _send_json(send, status: int, code: str, message: str, request_id: str) -> None:
    body = _error_body(code, message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (REQUEST_ID_HEADER, request_id.encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
