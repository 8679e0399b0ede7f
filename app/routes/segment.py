"""The client API: list models, segment an image, fetch a block key."""

from __future__ import annotations

import asyncio
from typing import Annotated

import torch
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from seglock.app import inference
from seglock.app.deps import AuditDep, RegistryDep, SegmentGrant, SettingsDep
from seglock.app.engine import EngineStopped, Overloaded
from seglock.app.errors import bad_request, forbidden, overloaded, unsupported_media
from seglock.app.imageio import decode_upload
from seglock.app.registry import HostedModel, Registry
from seglock.client.modes import Mode
from seglock.keystore.tokens import Grant

router = APIRouter(prefix="/v1", tags=["segmentation"])

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary",
                                     "description": "PNG, JPEG, WebP, or .npy (encrypted tensors)"}},
        }}},
    },
}
_SEGMENT_BODY = {
    **IMAGE_BODY,
    "responses": {"200": {"content": {"image/png": {}, "application/json": {}},
                          "description": "class-index mask (palette PNG) or JSON"}},
}


def hosted_for(registry: Registry, name: str, principal: Grant) -> HostedModel:
    hosted = registry.get(name)  # ModelNotFound (404) for unknown names
    if not principal.allows_model(name):
        raise forbidden(f"this token is not granted model {name}")
    return hosted


@router.get("/models", summary="The models this token may use, with their public protection parameters")
async def list_models(registry: RegistryDep, principal: SegmentGrant) -> dict:
    return {"models": [registry.get(n).public_info() for n in registry.names() if principal.allows_model(n)]}


@router.get("/models/{name}/client-key", summary="The block key an SDK encrypts with (shf/np/ffx models)")
async def client_key(name: str, registry: RegistryDep, audit: AuditDep, principal: SegmentGrant) -> dict:
    hosted = hosted_for(registry, name, principal)
    if not hosted.mode.is_block:
        raise bad_request(f"model {name} is {hosted.mode}: it has no client key")
    audit(principal, "client-key", name, "ok")
    return {"model": name, "key_version": hosted.key_version, "key": hosted.block_key.to_dict()}


@router.post("/models/{name}/segment", summary="Segment one image", openapi_extra=_SEGMENT_BODY,
             response_class=Response)
async def segment(
    name: str,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    principal: SegmentGrant,
    accept: Annotated[str | None, Header()] = None,
    x_seglock_key_version: Annotated[str | None, Header()] = None,
    x_seglock_encrypted: Annotated[str | None, Header()] = None,
) -> Response:
    hosted = hosted_for(registry, name, principal)
    data = await read_image_field(request)
    encrypted = x_seglock_key_version is not None or _truthy(x_seglock_encrypted)
    if encrypted:
        if not hosted.mode.encrypts_input:
            raise bad_request(f"model {name} is {hosted.mode}: send a plain image")
        if hosted.mode.is_block:
            inference.check_key_version(hosted, x_seglock_key_version)

    def decode_and_prepare() -> tuple[torch.Tensor, tuple[int, int]]:  # one trip to a worker thread, not two
        upload = decode_upload(data, max_pixels=settings.max_pixels)
        return inference.prepare(upload, hosted, encrypted=encrypted)

    tensor, size = await asyncio.to_thread(decode_and_prepare)
    try:
        mask = await hosted.batcher.submit(tensor)
    except Overloaded as exc:
        raise overloaded(str(exc)) from None
    except EngineStopped as exc:
        raise overloaded(str(exc), retry_after_s=5) from None
    headers = {
        "X-Seglock-Model": name,
        "X-Seglock-Model-Version": str(hosted.revision),
        "X-Seglock-Key-Version": "" if hosted.key_version is None else str(hosted.key_version),
    }
    if _wants_json(accept):
        body = await asyncio.to_thread(inference.mask_json, mask, size, hosted)
        return Response(body, media_type="application/json", headers=headers)
    body = await asyncio.to_thread(inference.mask_png, mask, size)
    return Response(body, media_type="image/png", headers=headers)


async def read_image_field(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise unsupported_media("send the image as multipart/form-data in a field named 'image'")
    form = await request.form(max_files=1, max_fields=8)
    try:
        field = form.get("image")
        if field is None or isinstance(field, str):
            raise bad_request("multipart field 'image' (a file) is missing")
        return await field.read()
    finally:
        await form.close()


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", Mode.PER_IMAGE)


def _wants_json(accept: str | None) -> bool:
    if not accept:
        return False
    return "application/json" in accept and "image/png" not in accept.split(",")[0]

