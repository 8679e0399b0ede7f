"""Who a token is: what the console asks first, to show only what the token may use."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from seglock.app.deps import KeystoreDep
from seglock.app.errors import error_responses
from seglock.app.security import authenticate_any
from seglock.keystore.tokens import Grant

router = APIRouter(prefix="/v1", tags=["account"])


def any_grant(request: Request, keystore: KeystoreDep) -> Grant:
    """The request's token, whatever its scopes (401 for a missing, bad, revoked or expired one)."""
    return authenticate_any(request, keystore)


AnyGrant = Annotated[Grant, Depends(any_grant)]


class WhoAmI(BaseModel):
    id: str = Field(description="the token's id (the part before its secret)")
    name: str
    scopes: list[Literal["segment", "admin"]]
    models: list[str] = Field(description='the granted models; ["*"] = every model')
    expires_at: float | None = Field(description="epoch seconds; none = no expiry")


@router.get("/whoami", summary="The calling token's id, name, scopes and granted models (never its secret)",
            response_model=WhoAmI, responses=error_responses(401))
async def whoami(principal: AnyGrant) -> dict:
    return {"id": principal.token_id, "name": principal.name,
            "scopes": [scope for scope in ("segment", "admin") if principal.has_scope(scope)],
            "models": sorted(principal.models), "expires_at": principal.expires_at}
