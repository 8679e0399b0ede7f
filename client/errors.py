"""The SDK's exceptions: one base type, one subclass per kind of failure a caller handles differently.

Every exception carries the server's error `code` and `message` (DESIGN: `{"error": {"code",
"message"}}`), the HTTP `status` (None when no answer came back) and the server's request id.
Messages come from the server or from the SDK, never from the request, so a token cannot leak
into one.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any

_MAX_MESSAGE = 300  # a non-JSON error page is cut to this many characters


class SegLockError(Exception):
    """Base class of every SDK error: `status` (int or None), `code`, `message`, `request_id`."""

    default_code = "error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.status = status
        self.request_id = request_id

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class AuthenticationError(SegLockError):
    """401: the token is missing, malformed, unknown, revoked or expired."""

    default_code = "unauthorized"


class PermissionDenied(SegLockError):
    """403: the token lacks the scope, or is not granted the model."""

    default_code = "forbidden"


class ModelNotFound(SegLockError):
    """404: the server hosts no model of that name."""

    default_code = "not_found"


class KeyVersionConflict(SegLockError):
    """409: the input was encrypted with a key version the model no longer uses."""

    default_code = "conflict"


class InvalidInput(SegLockError):
    """Any other 4xx, or an image the SDK cannot read before sending it (status None)."""

    default_code = "invalid_input"


class Overloaded(SegLockError):
    """503: the server is busy; `retry_after` is its advice in seconds (None if it gave none)."""

    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RateLimited(Overloaded):
    """429: too many requests from this token; a kind of `Overloaded`, with `retry_after`."""

    default_code = "rate_limited"


class ServerError(SegLockError):
    """5xx other than 503, or an answer the SDK cannot understand."""

    default_code = "server_error"


class ConnectionFailed(SegLockError):
    """No answer: the connection failed or timed out (after the retries, where they apply)."""

    default_code = "connection_failed"


_BY_STATUS: dict[int, type[SegLockError]] = {
    401: AuthenticationError,
    403: PermissionDenied,
    404: ModelNotFound,
    409: KeyVersionConflict,
    429: RateLimited,
    503: Overloaded,
}

RETRYABLE_STATUSES = frozenset({429, 503})


def error_for_status(status: int, body: bytes, headers: Mapping[str, str], *,
                     now: float | None = None) -> SegLockError:
    """The exception for an error answer: its class from the status, code and message from the body."""
    code, message = _parse_body(status, body)
    kind = _BY_STATUS.get(status)
    if kind is None:
        kind = InvalidInput if 400 <= status < 500 else ServerError
    request_id = headers.get("x-request-id")
    if issubclass(kind, Overloaded):
        retry_after = parse_retry_after(headers.get("retry-after"), now=now)
        return kind(message, code=code, status=status, request_id=request_id, retry_after=retry_after)
    return kind(message, code=code, status=status, request_id=request_id)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None  # Python 3.10+ raises rather than returning None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _parse_body(status: int, body: bytes) -> tuple[str | None, str]:
    try:
        error = json.loads(body)["error"]
        code, message = error["code"], error["message"]
        if isinstance(code, str) and isinstance(message, str):
            return code, message
    except (ValueError, KeyError, TypeError):
        pass
    text = body.decode("utf-8", errors="replace").strip().splitlines()
    message = text[0][:_MAX_MESSAGE] if text else f"HTTP {status} without an error body"
    return None, message
