"""Admin API: tokens and key rotation. Every action lands in the keystore's audit log."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from seglock.app.errors import not_found
from seglock.app.security import Principal, require_scope
from seglock.keystore.errors import TokenNotFound
from seglock.keystore.tokens import describe_token_id

router = APIRouter(prefix="/admin", tags=["admin"])
admin_only = require_scope("admin")


class TokenRequest(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    scopes: list[Literal["segment", "admin"]] = Field(default_factory=lambda: ["segment"], min_length=1)
    models: list[str] = Field(default_factory=list)
    expires_in_s: float | None = Field(None, gt=0, description="lifetime in seconds; none = no expiry")


@router.post("/tokens", status_code=201, summary="Make a token; its secret is shown only in this answer")
async def create_token(body: TokenRequest, request: Request, principal: Principal = Depends(admin_only)) -> dict:
    keystore = request.app.state.keystore
    expires_at = None if body.expires_in_s is None else time.time() + body.expires_in_s
    record, token = await asyncio.to_thread(
        keystore.create_token, body.name, body.scopes, body.models,
        expires_at=expires_at, actor=principal.token_id)
    return {"id": record.id, "token": token, **{k: v for k, v in record.public_dict().items() if k != "id"}}


@router.get("/tokens", summary="List tokens (never their secrets)")
async def list_tokens(request: Request, principal: Principal = Depends(admin_only)) -> dict:
    return {"tokens": [record.public_dict() for record in request.app.state.keystore.list_tokens()]}


@router.delete("/tokens/{token_id}", status_code=204, summary="Revoke a token; effective on the next request")
async def revoke_token(token_id: str, request: Request, principal: Principal = Depends(admin_only)) -> Response:
    keystore = request.app.state.keystore
    try:
        await asyncio.to_thread(keystore.revoke_token, token_id, actor=principal.token_id)
    except TokenNotFound:
        raise not_found(f"no token with id {describe_token_id(token_id)}") from None
    return Response(status_code=204)


@router.post("/models/{name}/rotate-key", summary="Re-key a CP model exactly, without retraining")
async def rotate_key(name: str, request: Request, principal: Principal = Depends(admin_only)) -> dict:
    state = request.app.state
    try:
        result = await state.registry.rotate_key(name)
    except Exception:
        state.audit(principal, "rotate-key", name, "failed")
        raise
    state.audit(principal, "rotate-key", name, "ok")
    return result
