"""seglock's client side: the HTTP SDK, the `seglock-client` command, and the block transforms.

    from seglock.client import SegLockClient
    with SegLockClient("http://127.0.0.1:8000", token) as client:
        mask = client.segment("photo.jpg", "demo-shf")     # HxW uint8 class indices

Imports only numpy, Pillow, httpx (and pyffx for FFX tables): never torch or the server.
The SDK names load on first use, so `import seglock.client.transforms` (training, the server) does
not pay for httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SegLockClient": "seglock.client.sdk",
    "AsyncSegLockClient": "seglock.client.sdk",
    "ModelInfo": "seglock.client.sdk",
    "Mode": "seglock.client.modes",
    "RetryPolicy": "seglock.client.sdk",
    "SegLockError": "seglock.client.errors",
    "AuthenticationError": "seglock.client.errors",
    "PermissionDenied": "seglock.client.errors",
    "ModelNotFound": "seglock.client.errors",
    "KeyVersionConflict": "seglock.client.errors",
    "InvalidInput": "seglock.client.errors",
    "Overloaded": "seglock.client.errors",
    "RateLimited": "seglock.client.errors",
    "ServerError": "seglock.client.errors",
    "ConnectionFailed": "seglock.client.errors",
}

__all__ = [  # _EXPORTS' names, written out so that linters and type checkers see them
    "AsyncSegLockClient", "AuthenticationError", "ConnectionFailed", "InvalidInput", "KeyVersionConflict",
    "Mode", "ModelInfo", "ModelNotFound", "Overloaded", "PermissionDenied", "RateLimited", "RetryPolicy",
    "SegLockClient", "SegLockError", "ServerError",
]

if TYPE_CHECKING:
    from seglock.client.errors import (
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
    from seglock.client.modes import Mode
    from seglock.client.sdk import AsyncSegLockClient, ModelInfo, RetryPolicy, SegLockClient


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
