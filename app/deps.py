"""The server's typed wiring: what a route may ask for, as FastAPI `Annotated` dependencies.

`create_app` keeps the service's parts on `app.state`; routes never read it themselves. They name what
they need by type instead:

    async def route(name: str, registry: RegistryDep, grant: SegmentGrant) -> dict: ...

`SegmentGrant` and `AdminGrant` authenticate the request's bearer token for their scope (401 or 403
otherwise; a segment grant also passes the per-token rate limit) and give its `Grant`. The accessors
are coroutines so that FastAPI calls them inline. `SegmentGrant`, on every inference request, is one
too: it checks the token inline and re-reads a changed keystore in a thread first; `AdminGrant` stays a
plain function (a refusal is audited, a write), which FastAPI runs in its thread pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from seglock.app.audit import Auditor as AuditLogger
from seglock.app.errors import APIError
from seglock.app.imageio import UploadGate
from seglock.app.observability import Metrics
from seglock.app.ratelimit import RateLimiter
from seglock.app.registry import Registry
from seglock.app.security import authenticate, bearer_scheme
from seglock.app.settings import Settings
from seglock.keystore import Keystore
from seglock.keystore.tokens import Grant

# Writes one audit entry: (grant, action, target, outcome); never raises.
Auditor = Callable[[Grant, str, str, str], None]


def _starting() -> APIError:
    return APIError(503, "unavailable", "the server is starting", {"Retry-After": "1"})


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_optional_registry(request: Request) -> Registry | None:
    """The registry, or None while the server is still starting."""
    return getattr(request.app.state, "registry", None)


async def get_registry(request: Request) -> Registry:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        raise _starting()
    return registry


async def get_keystore(request: Request) -> Keystore:
    keystore = getattr(request.app.state, "keystore", None)
    if keystore is None:
        raise _starting()
    return keystore


async def get_audit(request: Request) -> Auditor:
    audit = getattr(request.app.state, "audit", None)
    if audit is None:
        raise _starting()
    return audit


async def get_auditor(request: Request) -> AuditLogger:
    """The server's audit writer (`seglock.app.audit.Auditor`): raises when an entry cannot be written."""
    auditor = getattr(request.app.state, "auditor", None)
    if auditor is None:
        raise _starting()
    return auditor


async def get_optional_auditor(request: Request) -> AuditLogger | None:
    """The audit writer, or None while the server is still starting (authentication needs no log then)."""
    return getattr(request.app.state, "auditor", None)


async def get_upload_gate(request: Request) -> UploadGate:
    return request.app.state.upload_gate


async def get_rate_limiter(request: Request) -> RateLimiter | None:
    """The per-token limit on segment requests; None when there is none."""
    return getattr(request.app.state, "rate_limiter", None)


async def is_ready(request: Request) -> bool:
    return bool(getattr(request.app.state, "ready", False))


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
OptionalRegistryDep = Annotated[Registry | None, Depends(get_optional_registry)]
KeystoreDep = Annotated[Keystore, Depends(get_keystore)]
AuditDep = Annotated[Auditor, Depends(get_audit)]
AuditorDep = Annotated["AuditLogger", Depends(get_auditor)]
OptionalAuditorDep = Annotated["AuditLogger | None", Depends(get_optional_auditor)]
UploadGateDep = Annotated["UploadGate", Depends(get_upload_gate)]
RateLimiterDep = Annotated[RateLimiter | None, Depends(get_rate_limiter)]
ReadyDep = Annotated[bool, Depends(is_ready)]


Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]  # declares the scheme in OpenAPI


async def segment_grant(request: Request, keystore: KeystoreDep, limiter: RateLimiterDep, _bearer: Bearer) -> Grant:
    """The request's token, admitted for the segment scope and within its rate limit.

    Checked on the event loop (a hash and a look-up in memory) unless the keystore changed since it
    was read: the reload (reading, decrypting, perhaps scrypt) runs in a thread first."""
    if keystore.changed():
        await asyncio.to_thread(keystore.refresh)
    return authenticate(request, keystore, "segment", limiter)


def admin_grant(request: Request, keystore: KeystoreDep, auditor: OptionalAuditorDep, _bearer: Bearer) -> Grant:
    """The request's token, admitted for the admin scope; a refused attempt is audited."""
    return authenticate(request, keystore, "admin", auditor=auditor)


SegmentGrant = Annotated[Grant, Depends(segment_grant)]
AdminGrant = Annotated[Grant, Depends(admin_grant)]
