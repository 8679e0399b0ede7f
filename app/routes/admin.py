"""Admin API: tokens, models and key rotation, the thief view, the audit log.

Every action, and every refused attempt, lands in the keystore's audit log. An admin token is
bounded by its own grants: it makes tokens with at most its scopes and models, sees and revokes
only tokens within its models, and rotates only models it is granted.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from seglock.app import thief
from seglock.app.audit import Auditor as AuditLogger
from seglock.app.deps import AdminGrant, AuditDep, AuditorDep, KeystoreDep, RegistryDep, SettingsDep, UploadGateDep
from seglock.app.engine import EngineStopped, Overloaded
from seglock.app.errors import bad_request, conflict, error_responses, forbidden, not_found, overloaded, too_large
from seglock.app.imageio import decode_upload
from seglock.app.registry import Registry
from seglock.app.routes.segment import IMAGE_BODY, read_image_field
from seglock.client.modes import Mode
from seglock.keystore import Keystore
from seglock.keystore.errors import TokenNotFound
from seglock.keystore.tokens import ALL_MODELS, Grant, TokenRecord, describe_token_id
from seglock.models import ArtifactError

router = APIRouter(prefix="/admin", tags=["admin"])


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
    def _star_alone(self) -> TokenRequest:
        if ALL_MODELS in self.models and len(set(self.models)) > 1:
            raise ValueError('"*" grants every model and cannot be listed with names')
        return self


def _within(principal: Grant, models) -> bool:
    """Whether `principal` holds every model of `models` ("*" only if it holds "*")."""
    return principal.all_models or (ALL_MODELS not in models and set(models) <= principal.models)


async def _record(auditor: AuditLogger, principal: Grant, action: str, target: str | None, outcome: str,
                  detail: str | None = None) -> None:
    await asyncio.to_thread(auditor.record, principal.token_id, action, target, outcome, detail)


@router.post("/tokens", status_code=201, summary="Make a token; its secret is shown only in this answer",
             responses=error_responses(400, 401, 403, 413, 422, 503))
async def create_token(body: TokenRequest, keystore: KeystoreDep, auditor: AuditorDep,
                       principal: AdminGrant) -> JSONResponse:
    # An admin token grants the use (`segment`) or the administration (`admin`) of the models it
    # administers, never of others: its models bound what it can give.
    if not set(body.scopes) <= principal.scopes | {"segment"} or not _within(principal, body.models):
        await _record(auditor, principal, "token.create", None, "denied",
                      f"asked scopes={','.join(body.scopes)} models={','.join(sorted(set(body.models)))}")
        raise forbidden("an admin token can only grant the models it holds")
    expires_at = None if body.expires_in_s is None else time.time() + body.expires_in_s
    record, token = await asyncio.to_thread(
        keystore.create_token, body.name, body.scopes, body.models,
        expires_at=expires_at, actor=principal.token_id)
    content = {"id": record.id, "token": token, **{k: v for k, v in record.public_dict().items() if k != "id"}}
    return JSONResponse(content, status_code=201, headers=NO_STORE)


@router.get("/tokens", summary="List tokens (never their secrets)", responses=error_responses(401, 403, 503))
async def list_tokens(keystore: KeystoreDep, principal: AdminGrant) -> JSONResponse:
    records = await asyncio.to_thread(keystore.list_tokens)
    visible = [r.public_dict() for r in records if _within(principal, r.models)]
    return JSONResponse({"tokens": visible}, headers=NO_STORE)


@router.delete("/tokens/{token_id}", status_code=204, summary="Revoke a token; effective on the next request",
               responses=error_responses(401, 403, 404, 503))
async def revoke_token(token_id: str, keystore: KeystoreDep, auditor: AuditorDep, principal: AdminGrant) -> Response:
    missing = not_found(f"no token with id {describe_token_id(token_id)}")
    try:
        record: TokenRecord = await asyncio.to_thread(keystore.get_token, token_id)
    except TokenNotFound:
        raise missing from None
    if not _within(principal, record.models):  # as if it did not exist: ids outside its grants stay unknown
        await _record(auditor, principal, "token.revoke", record.id, "denied")
        raise missing
    await asyncio.to_thread(keystore.revoke_token, token_id, actor=principal.token_id)
    return Response(status_code=204)


@router.post("/models/{name}/rotate-key", summary="Re-key a CP model exactly, without retraining",
             responses=error_responses(400, 401, 403, 404, 409, 503))
async def rotate_key(name: str, registry: RegistryDep, auditor: AuditorDep, principal: AdminGrant) -> dict:
    if not principal.allows_model(name):
        await _record(auditor, principal, "rotate-key", name, "denied")
        raise forbidden(f"this token is not granted model {name}")
    try:
        result = await registry.rotate_key(name)
    except Exception as exc:
        await _record(auditor, principal, "rotate-key", name, "error", type(exc).__name__)
        raise
    await _record(auditor, principal, "rotate-key", name, "ok",
                  f"key_version {result['previous_key_version']} -> {result['key_version']}")
    return result


# -- models, the thief view, the audit log (the console's admin pages) ---------------------------

class KeyVersionInfo(BaseModel):
    version: int
    id: str
    kind: str
    state: Literal["pending", "active", "retiring", "destroyed"]
    created_at: float
    activated_at: float | None
    retired_at: float | None
    destroyed_at: float | None
    created_by: str | None


class AdminModel(BaseModel):
    name: str
    mode: str
    protection: dict
    model_version: int = Field(description="the artifact revision served")
    key_version: int | None = Field(description="the key version served; none for keyless models")
    revisions: list[int] = Field(description="artifact revisions on disk")
    key_versions: list[KeyVersionInfo] = Field(description="every version of the model's key, never its material")
    architecture: str
    num_classes: int
    class_names: list[str]
    input_size: list[int]
    rotatable: bool = Field(description="true for cp models: rotate-key re-keys them exactly")
    suite_report: bool = Field(description="a thief's-advantage suite report is in the model's folder")


class AdminModels(BaseModel):
    models: list[AdminModel]


@router.get("/models", summary="Every hosted model with its protection, revisions and key versions",
            response_model=AdminModels, responses=error_responses(401, 403, 503))
async def list_models(registry: RegistryDep, keystore: KeystoreDep, principal: AdminGrant) -> JSONResponse:
    # off the event loop (the keystore and the home are read); only the models this token administers
    models = await asyncio.to_thread(_admin_models, registry, keystore, principal)
    return JSONResponse(AdminModels(models=models).model_dump(mode="json"), headers=NO_STORE)


def _admin_models(registry: Registry, keystore: Keystore, principal: Grant) -> list[dict]:
    home = registry.home
    models = []
    for name in registry.names():
        if not principal.allows_model(name):
            continue
        hosted = registry.get(name)
        info = hosted.public_info()
        versions = [{k: v for k, v in key.public_dict().items() if k != "model"}
                    for key in keystore.model_key_versions(name)]
        models.append({
            **{k: info[k] for k in ("name", "model_version", "key_version", "architecture", "num_classes",
                                    "class_names", "input_size", "protection")},
            "mode": str(hosted.mode),
            "revisions": sorted(home.revisions(name)),
            "key_versions": versions,
            "rotatable": hosted.mode is Mode.CP,
            "suite_report": thief.suite_report(home, name) is not None,
        })
    return models


class MaskView(BaseModel):
    mask_png: str = Field(description="base64 palette PNG whose pixel values are class indices")
    counts: dict[str, int] = Field(description="pixels per class name (classes with none left out)")


class ThiefView(BaseModel):
    model: str
    mode: str
    model_version: int
    key_version: int | None
    height: int
    width: int
    class_names: list[str]
    with_key: MaskView = Field(description="what the server answers a granted token")
    without_key: MaskView = Field(description="what the stolen artifact gives without the key")
    without_key_means: str
    agreement: float = Field(description="fraction of pixels on which the two masks agree")
    advantage: dict | None = Field(
        description="the model's suite report (seglock attack suite --json) from its folder, or none")


@router.post("/models/{name}/thief-view", summary="One image with the key and through the stolen weights without it",
             response_model=ThiefView, openapi_extra=IMAGE_BODY,
             responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 503))
async def thief_view(name: str, request: Request, registry: RegistryDep, settings: SettingsDep,
                     gate: UploadGateDep, audit: AuditDep, auditor: AuditorDep, principal: AdminGrant) -> dict:
    if not principal.allows_model(name):  # unknown and ungranted names alike, as on /v1
        await _record(auditor, principal, "thief-view", name, "denied")
        raise forbidden(f"this token is not granted model {name}")
    hosted = await asyncio.to_thread(registry.get, name)  # 404 for unknown names (to a `*` token)
    if hosted.mode is Mode.NONE:
        raise bad_request(f"model {name} is not protected: a thief gets the same mask as its owner")
    async with gate.slot() as slot:  # the body is read and decoded inside an upload slot, as on /v1
        data = await read_image_field(request)
        slot.holds(len(data))
        upload = await asyncio.to_thread(decode_upload, data, max_pixels=settings.max_pixels)
        slot.holds(upload.array.nbytes)
        del data
        if upload.array.dtype != np.uint8:
            raise bad_request("the thief view takes a plain 8-bit image (PNG, JPEG or WebP)")
        if upload.size[0] * upload.size[1] > settings.max_json_mask_pixels:  # two masks come back as base64 PNGs
            raise too_large(f"a {upload.size[0]}x{upload.size[1]} image is too large for the thief view "
                            f"(limit {settings.max_json_mask_pixels} pixels)")
        keyed_input, plain_input = await asyncio.to_thread(thief.model_inputs, upload, hosted)
    revision, key_version, manifest = hosted.revision, hosted.key_version, hosted.manifest
    artifact = registry.home.revisions(name).get(revision)
    try:
        with_key = await hosted.batcher.submit(keyed_input)
        if hosted.mode is Mode.CP:
            without_key = await asyncio.to_thread(thief.stolen_mask, registry.home, name, artifact, plain_input,
                                                    registry.device)
        else:  # block and per-image weights are served as stored: the thief feeds them plain images
            without_key = await hosted.batcher.submit(plain_input)
    except (Overloaded, EngineStopped) as exc:
        raise overloaded(str(exc)) from None
    except ArtifactError:  # a rotation removed the revision while the view was being made
        raise conflict(f"model {name} was re-keyed meanwhile: try again") from None
    except Exception:
        await asyncio.to_thread(audit, principal, "thief-view", name, "error")
        raise
    size = upload.array.shape[:2]
    del upload
    names = list(manifest.class_names)

    def summaries() -> tuple[tuple, tuple, float]:
        keyed = thief.mask_summary(with_key, size, names)
        stolen = thief.mask_summary(without_key, size, names)
        return keyed, stolen, round(float((keyed[0] == stolen[0]).mean()), 6)

    async with gate.slot() as slot:  # two full-size masks, as a decode costs
        slot.holds(2 * size[0] * size[1])
        (_, keyed_view), (_, stolen_view), agreement = await asyncio.to_thread(summaries)
    # an admin action: recorded before its answer leaves (503 if it cannot be)
    await _record(auditor, principal, "thief-view", name, "ok")
    return {
        "model": name, "mode": str(hosted.mode), "model_version": revision, "key_version": key_version,
        "height": int(size[0]), "width": int(size[1]), "class_names": names,
        "with_key": keyed_view, "without_key": stolen_view,
        "without_key_means": thief.without_key_means(hosted.mode),
        "agreement": agreement,
        "advantage": await asyncio.to_thread(thief.suite_report, registry.home, name),
    }


class AuditPage(BaseModel):
    total: int = Field(description="entries matching the filters")
    offset: int
    limit: int
    entries: list[dict] = Field(description="newest first: time, actor, action, target, outcome, detail")


@router.get("/audit", summary="The audit log, newest first, paged and filtered (admins of every model)",
            response_model=AuditPage, responses=error_responses(401, 403, 422, 503))
async def audit_log(
    keystore: KeystoreDep,
    auditor: AuditorDep,
    principal: AdminGrant,
    offset: Annotated[int, Query(ge=0, description="entries to skip (newest first)")] = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="entries to return")] = 50,
    action: Annotated[str | None, Query(
        max_length=100, description="an action (token.create), or its family (token) for all token.* ones")] = None,
    actor: Annotated[str | None, Query(
        max_length=100, description="the acting token id, or cli/system/bootstrap")] = None,
) -> JSONResponse:
    if not principal.all_models:  # the log names every model and token: not for an admin of a few
        await _record(auditor, principal, "audit.read", None, "denied")
        raise forbidden("the audit log is for admin tokens granted every model")

    def page() -> dict:
        matching = [entry for entry in reversed(keystore.audit_log())
                    if (action is None or entry.action == action or entry.action.startswith(action + "."))
                    and (actor is None or entry.actor == actor)]
        return {"total": len(matching), "offset": offset, "limit": limit,
                "entries": [entry.to_json() for entry in matching[offset:offset + limit]]}

    return JSONResponse(await asyncio.to_thread(page), headers=NO_STORE)
