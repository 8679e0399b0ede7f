"""Admin API: tokens and key rotation. Every action, and every refused attempt, lands in the audit log.

An admin token is bounded by its own grants: it makes tokens with at most its scopes and
models, sees and revokes only tokens within its models, and rotates only models it is granted.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from seglock.app.errors import documented, forbidden, not_found
from seglock.app.security import Principal, require_scope
from seglock.keystore.errors import TokenNotFound
from seglock.keystore.tokens import ALL_MODELS, TokenRecord, describe_token_id

router = APIRouter(prefix="/admin", tags=["admin"])
admin_only = require_scope("admin")
NO_STORE = {"Cache-Control": "no-store"}
MAX_LIFETIME_S = 10 * 365 * 86_400  # ten years: a finite expiry the keystore can store

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# A model name as the registry accepts it, or "*" (every model).
ModelName = Annotated[str, Field(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")]


class TokenRequest(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@/+-][A-Za-z0-9 ._:@/+-]*$",
                      description="a label: letters, digits, space and . _ : @ / + -")
    scopes: list[Literal["segment", "admin"]] = Field(default_factory=lambda: ["segment"], min_length=1,
                                                      max_length=2)
    models: list[ModelName] = Field(min_length=1, max_length=256,
                                    description='model names this token may use (or administer), or ["*"]')
    expires_in_s: float | None = Field(None, ge=1, le=MAX_LIFETIME_S, allow_inf_nan=False,
                                       description="lifetime in seconds (1 s to ten years); none = no expiry")

    @staticmethod
    def _schema(schema: dict) -> None:
        # "*" stands alone: either exactly ["*"], or model names without it
        models = schema["properties"]["models"]
        models["items"] = {"type": "string", "pattern": rf"^(\*|{MODEL_NAME_PATTERN[1:-1]})$"}
        models["anyOf"] = [{"const": ["*"]}, {"items": {"type": "string", "pattern": MODEL_NAME_PATTERN,
                                                          "not": {"const": "*"}}}]

    model_config = {"json_schema_extra": _schema}

    @model_validator(mode="after")
    def _star_alone(self) -> "TokenRequest":
        if ALL_MODELS in self.models and len(set(self.models)) > 1:
            raise ValueError('"*" grants every model and cannot be listed with names')
        return self


def _within(principal: Principal, models: list[str] | tuple[str, ...]) -> bool:
    """Whether `principal` holds every model of `models` ("*" only if it holds "*")."""
    return principal.all_models or (ALL_MODELS not in models and set(models) <= principal.models)


async def _record(request: Request, principal: Principal, action: str, target: str | None, outcome: str,
                  detail: str | None = None) -> None:
    await asyncio.to_thread(request.app.state.auditor.record, principal.token_id, action, target, outcome, detail)


@router.post("/tokens", status_code=201, summary="Make a token; its secret is shown only in this answer",
             responses=documented(400, 401, 403, 413, 422, 503))
async def create_token(body: TokenRequest, request: Request, principal: Principal = Depends(admin_only)) -> JSONResponse:
    keystore = request.app.state.keystore
    if not set(body.scopes) <= principal.scopes or not _within(principal, body.models):
        await _record(request, principal, "token.create", None, "denied",
                      f"asked scopes={','.join(body.scopes)} models={','.join(sorted(set(body.models)))}")
        raise forbidden("an admin token can only grant the scopes and models it holds")
    expires_at = None if body.expires_in_s is None else time.time() + body.expires_in_s
    record, token = await asyncio.to_thread(
        keystore.create_token, body.name, body.scopes, body.models,
        expires_at=expires_at, actor=principal.token_id)
    content = {"id": record.id, "token": token, **{k: v for k, v in record.public_dict().items() if k != "id"}}
    return JSONResponse(content, status_code=201, headers=NO_STORE)


@router.get("/tokens", summary="List tokens (never their secrets)", responses=documented(401, 403, 503))
async def list_tokens(request: Request, principal: Principal = Depends(admin_only)) -> JSONResponse:
    records = await asyncio.to_thread(request.app.state.keystore.list_tokens)
    visible = [r.public_dict() for r in records if _within(principal, r.models)]
    return JSONResponse({"tokens": visible}, headers=NO_STORE)


@router.delete("/tokens/{token_id}", status_code=204, summary="Revoke a token; effective on the next request",
               responses=documented(401, 403, 404, 503))
async def revoke_token(token_id: str, request: Request, principal: Principal = Depends(admin_only)) -> Response:
    keystore = request.app.state.keystore
    missing = not_found(f"no token with id {describe_token_id(token_id)}")
    try:
        record: TokenRecord = await asyncio.to_thread(keystore.get_token, token_id)
    except TokenNotFound:
        raise missing from None
    if not _within(principal, record.models):  # as if it did not exist: ids outside its grants stay unknown
        await _record(request, principal, "token.revoke", record.id, "denied")
        raise missing
    await asyncio.to_thread(keystore.revoke_token, token_id, actor=principal.token_id)
    return Response(status_code=204)


@router.post("/models/{name}/rotate-key", summary="Re-key a CP model exactly, without retraining",
             responses=documented(400, 401, 403, 404, 409, 503))
async def rotate_key(name: str, request: Request, principal: Principal = Depends(admin_only)) -> dict:
    state = request.app.state
    if not principal.allows_model(name):
        await _record(request, principal, "rotate-key", name, "denied")
        raise forbidden(f"this token is not granted model {name}")
    try:
        result = await state.registry.rotate_key(name)
    except Exception as exc:
        await _record(request, principal, "rotate-key", name, "error", type(exc).__name__)
        raise
    await _record(request, principal, "rotate-key", name, "ok",
                  f"key_version {result['previous_key_version']} -> {result['key_version']}")
    return result
