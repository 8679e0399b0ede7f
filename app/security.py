"""Authentication as a FastAPI dependency: `Authorization: Bearer slk_...` checked in the keystore.

The keystore is re-read when its file changes (a cheap stat per request), so a token made or
revoked by the CLI in another process counts from the next request on.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.security import HTTPBearer

from seglock.app.audit import Auditor
from seglock.app.errors import forbidden, rate_limited, unauthorized
from seglock.app.ratelimit import RateLimiter, retry_after_header
from seglock.keystore import Keystore
from seglock.keystore.tokens import Grant, parse_token

# Declares the bearer scheme in the OpenAPI document (clients and fuzzers then send tokens);
# auto_error=False: the checks below answer with seglock's own 401 bodies.
bearer_scheme = HTTPBearer(auto_error=False, description="an API token: slk_<id>_<secret>")

Principal = Grant

_REASONS_401 = {
    "malformed": "the API token is malformed",
    "unknown": "the API token is not valid",
    "bad_secret": "the API token is not valid",
    "revoked": "the API token was revoked",
    "expired": "the API token has expired",
}


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def authenticate(request: Request, keystore: Keystore, scope: str, limiter: RateLimiter | None = None,
                 auditor: Auditor | None = None) -> Grant:
    """The grant of the request's token for `scope`, within `limiter`'s rate; 401, 403 or 429 otherwise.

    Routes take it as `seglock.app.deps.SegmentGrant` or `AdminGrant`; a refused admin attempt is
    written to `auditor` (when the server has one yet).
    """
    try:
        token = bearer_token(request)
    except Exception:
        _audit_denied(auditor, request, scope, "anonymous", "no_token")
        raise
    check = keystore.check_token(token, scope=scope)
    if check.ok:
        request.state.token_id = check.grant.token_id
        if limiter is not None:
            wait = limiter.acquire(check.grant.token_id)
            if wait:
                raise rate_limited(f"this token is over its limit of {limiter.rate:g} requests per second",
                                   retry_after_header(wait))
        return check.grant
    if check.status == 403:
        _audit_denied(auditor, request, scope, check.grant.token_id, check.reason)
        raise forbidden(f"this token lacks the '{scope}' scope")
    # a revoked or expired token names a real record; any other id is the caller's invention
    parts = parse_token(token) if check.reason in ("revoked", "expired") else None
    _audit_denied(auditor, request, scope, parts[0] if parts else "anonymous", check.reason)
    raise unauthorized(_REASONS_401.get(check.reason, "the API token is not valid"))


def _audit_denied(auditor: Auditor | None, request: Request, scope: str, actor: str, reason: str) -> None:
    """A refused admin attempt is audited, once per caller, reason and path per audit window.

    KeystoreError if it cannot be written: the caller then gets the generic 503, not the 401/403."""
    if scope != "admin" or auditor is None:
        return
    path = request.url.path[:200]
    auditor.record_once(("admin.denied", actor, reason, path), actor, "admin.denied",
                        f"{request.method} {path}", "denied", reason)


def authenticate_any(request: Request, keystore: Keystore) -> Grant:
    """The grant of the request's token whatever its scopes (`GET /v1/whoami`); 401 otherwise."""
    check = keystore.check_token(bearer_token(request), scope="segment")
    if (check.ok or check.reason == "scope") and check.grant is not None:  # valid, any scopes
        request.state.token_id = check.grant.token_id
        return check.grant
    raise unauthorized(_REASONS_401.get(check.reason, "the API token is not valid"))
