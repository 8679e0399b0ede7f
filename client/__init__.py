"""seglock's client side: the HTTP SDK, the `seglock-client` command, and the block transforms.

    from client import SegLockClient
    with SegLockClient("http://127.0.0.1:8000", token) as client:
        mask = client.segment("photo.jpg", "demo-shf")     # HxW uint8 class indices

Imports only numpy, Pillow, httpx (and pyffx for FFX tables): never torch or the server.
The SDK names load on first use, so `import client.transforms` (training, the server) does
not pay for httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SegLockClient": "client.sdk",
    "AsyncSegLockClient": "client.sdk",
    "ModelInfo": "client.sdk",
    "RetryPolicy": "client.sdk",
    "SegLockError": "client.errors",
    "AuthenticationError": "client.errors",
    "PermissionDenied": "client.errors",
    "ModelNotFound": "client.errors",
    "KeyVersionConflict": "client.errors",
    "InvalidInput": "client.errors",
    "Overloaded": "client.errors",
    "RateLimited": "client.errors",
    "ServerError": "client.errors",
    "ConnectionFailed": "client.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from client.errors import (
        AuthenticationError,
        ConnectionFailed,
        InvalidInput,
        KeyVersionConflict,
        ModelNotFound,
        Overloaded,
        PermissionDenied,
        RateLimited,
        SegLockError,
        ServerError,
    )
    from client.sdk import AsyncSegLockClient, ModelInfo, RetryPolicy, SegLockClient


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
