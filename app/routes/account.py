"""Who a token is: what the console asks first, to show only what the token may use."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from seglock.app.errors import error_responses
from seglock.app.security import Principal, require_token

router = APIRouter(prefix="/v1", tags=["account"])


class WhoAmI(BaseModel):
    id: str = Field(description="the token's id (the part before its secret)")
    name: str
    scopes: list[Literal["segment", "admin"]]
    models: list[str] = Field(description='the granted models; ["*"] = every model')
    expires_at: float | None = Field(description="epoch seconds; none = no expiry")


@router.get("/whoami", summary="The calling token's id, name, scopes and granted models (never its secret)",
            response_model=WhoAmI, responses=error_responses(401))
async def whoami(principal: Principal = Depends(require_token)) -> dict:
    return {"id": principal.token_id, "name": principal.name,
            "scopes": [scope for scope in ("segment", "admin") if principal.has_scope(scope)],
            "models": sorted(principal.models), "expires_at": principal.expires_at}
