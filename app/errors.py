"""The service's errors, and the one place they become DESIGN's JSON error body.

Domain errors (`ServiceError` and its subclasses) say what went wrong in the home, the registry
or a request's key version, without any HTTP in them; `http_status` maps them to a status and a
stable code once. Request-level failures are `APIError`s with their status and code. The handlers
in `install_error_handlers` make sure nothing else reaches the client.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("seglock.app")


# -- domain errors: what went wrong, not how HTTP says it ------------------------------------------


class ServiceError(Exception):
    """A model operation that cannot be done as asked; the message is safe to show (no secrets)."""


class InvalidModelName(ServiceError, ValueError):
    """A name that breaks the model-name rule (seglock.client.modes.check_model_name)."""


class ModelNotFound(ServiceError):
    """No model of that name in the home, or none served."""


class ModelExists(ServiceError):
    """The home already has a model of that name."""


class KeyRequired(ServiceError):
    """A keyed model was given without its key."""


class NotRotatable(ServiceError):
    """The model's mode has no key to rotate (none, per-image)."""


class NeedsRetraining(ServiceError):
    """A new key for this mode means a new model (shf, np, ffx: the key is the model's input)."""


class ModelUnavailable(ServiceError):
    """The home's disk and keystore do not give a servable (artifact, key) pair for the model."""


class StaleKeyVersion(ServiceError):
    """An encrypted input names no key version, or not the current one."""


_DOMAIN_HTTP: dict[type[ServiceError], tuple[int, str]] = {
    InvalidModelName: (400, "bad_request"),
    KeyRequired: (400, "bad_request"),
    NotRotatable: (400, "bad_request"),
    ModelNotFound: (404, "not_found"),
    ModelExists: (409, "conflict"),
    NeedsRetraining: (409, "conflict"),
    StaleKeyVersion: (409, "conflict"),
    ModelUnavailable: (503, "unavailable"),
}


def http_status(exc: ServiceError) -> tuple[int, str]:
    """(status, code) of a domain error: the nearest mapped class, else 400 bad_request."""
    for cls in type(exc).__mro__:
        if cls in _DOMAIN_HTTP:
            return _DOMAIN_HTTP[cls]
    return 400, "bad_request"


# -- request errors -------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered to the client as `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> APIError:
    return APIError(400, "bad_request", message)


def unauthorized(message: str = "missing or invalid API token") -> APIError:
    return APIError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> APIError:
    return APIError(403, "forbidden", message)


def not_found(message: str) -> APIError:
    return APIError(404, "not_found", message)


def conflict(message: str) -> APIError:
    return APIError(409, "conflict", message)


def too_large(message: str) -> APIError:
    return APIError(413, "too_large", message)


def unsupported_media(message: str) -> APIError:
    return APIError(415, "unsupported_media_type", message)


def unprocessable(message: str) -> APIError:
    return APIError(422, "unprocessable", message)


def rate_limited(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(429, "rate_limited", message, {"Retry-After": str(retry_after_s)})


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, "overloaded", message, {"Retry-After": str(retry_after_s)})


_STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "too_large",
    415: "unsupported_media_type", 422: "unprocessable", 429: "rate_limited", 503: "overloaded",
}


def allowed_methods(request: Request) -> list[str]:
    """Every method the OpenAPI document lists at this request's path (Starlette's own Allow header
    names only the first route that matched the path)."""
    path = request.url.path
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{[^}]+\})", template))
        if re.fullmatch(pattern, path):
            methods |= {m.upper() for m in operations if m in _HTTP_METHODS}
    return sorted(methods)


_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        status, code = http_status(exc)
        return error_response(status, code, str(exc), {"Retry-After": "5"} if status == 503 else None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(exc.status_code, code, str(exc.detail), headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return error_response(422, "unprocessable", message)


_DESCRIPTIONS = {
    400: "bad input", 401: "no or bad token", 403: "scope or grant missing", 404: "unknown model or id",
    409: "conflict (stale key version, key that cannot rotate)", 413: "too large",
    415: "unsupported media type", 422: "invalid parameters", 429: "rate limited",
    503: "overloaded or keystore unavailable",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these error statuses, each with DESIGN's error body."""
    schema = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
    return {status: {"description": _DESCRIPTIONS.get(status, "error"),
                     "content": {"application/json": {"schema": schema}}} for status in statuses}


documented = error_responses  # the hardening routes' name for it
