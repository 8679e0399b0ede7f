"""The client API: list models, segment an image, fetch a block key."""

from __future__ import annotations

import asyncio
from typing import Annotated

import torch
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

from seglock.app import inference
from seglock.app.deps import AuditorDep, RegistryDep, SegmentGrant, SettingsDep, UploadGateDep
from seglock.app.engine import EngineStopped, Overloaded
from seglock.app.errors import bad_request, documented, forbidden, overloaded, too_large, unsupported_media
from seglock.app.imageio import decode_upload, decoded_nbytes
from seglock.app.offload import run_off_loop
from seglock.app.registry import HostedModel, Registry
from seglock.app.settings import Settings
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


NO_STORE = {"Cache-Control": "no-store"}
JSON_BYTES_PER_PIXEL = 8  # a JSON mask is built as nested lists: a pointer per pixel, then the text


async def hosted_for(registry: Registry, name: str, principal: Grant) -> HostedModel:
    """The model, if this token is granted it. A token is never told whether a model it is not
    granted exists: unknown and ungranted names get the same 403 (a `*` token sees 404s)."""
    if not principal.allows_model(name):
        raise forbidden(f"this token is not granted model {name}")
    hosted = registry.current(name)  # a lookup in what the token check just refreshed
    # otherwise off the event loop: following another worker's rotation loads a model
    return hosted if hosted is not None else await asyncio.to_thread(registry.get, name)  # ModelNotFound (404)


@router.get("/models", summary="The models this token may use, with their public protection parameters",
            responses=documented(401, 403, 429, 503))
async def list_models(registry: RegistryDep, principal: SegmentGrant) -> dict:
    def granted() -> list[dict]:
        return [registry.get(n).public_info() for n in registry.names() if principal.allows_model(n)]

    return {"models": await asyncio.to_thread(granted)}


@router.get("/models/{name}/client-key", summary="The block key an SDK encrypts with (shf/np/ffx models)",
            responses=documented(400, 401, 403, 404, 429, 503))
async def client_key(name: str, registry: RegistryDep, auditor: AuditorDep, principal: SegmentGrant) -> Response:
    hosted = await hosted_for(registry, name, principal)
    if not hosted.mode.is_block:
        raise bad_request(f"model {name} is {hosted.mode}: it has no client key")
    version = hosted.key_version
    # Audited before it is released (once per token, model, version and window); if the record
    # cannot be written the KeystoreError becomes a 503 and no key leaves the server.
    await asyncio.to_thread(auditor.record_once, ("client-key", principal.token_id, name, version),
                            principal.token_id, "client-key", name, "ok", f"key_version={version}")
    return JSONResponse({"model": name, "key_version": version, "key": hosted.block_key.to_dict()},
                        headers=NO_STORE)


@router.post("/models/{name}/segment", summary="Segment one image", openapi_extra=_SEGMENT_BODY,
             response_class=Response, responses=documented(400, 401, 403, 404, 409, 413, 415, 422, 429, 503))
async def segment(
    name: str,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    gate: UploadGateDep,
    principal: SegmentGrant,
    accept: Annotated[str | None, Header()] = None,
    x_seglock_key_version: Annotated[str | None, Header()] = None,
    x_seglock_encrypted: Annotated[str | None, Header()] = None,
) -> Response:
    hosted = await hosted_for(registry, name, principal)
    encrypted = x_seglock_key_version is not None or _truthy(x_seglock_encrypted)
    if encrypted:
        if not hosted.mode.encrypts_input:
            raise bad_request(f"model {name} is {hosted.mode}: send a plain image")
        if hosted.mode.is_block:
            inference.check_key_version(hosted, x_seglock_key_version)
    wants_json = _wants_json(accept)
    # The body is read and decoded only inside a slot: memory stays bounded however many upload at once.
    with hosted.batcher.arriving() as arrival:  # a batch being collected waits for this one
        async with gate.slot() as slot:
            data = await read_image_field(request)
            slot.holds(len(data))
            tensor, size, decoded = await run_off_loop(
                decoded_nbytes(data), model_input, data, hosted, settings, encrypted=encrypted,
                wants_json=wants_json)
            slot.holds(decoded)
            del data
        try:
            mask = await hosted.batcher.submit(tensor, arrival)
        except Overloaded as exc:
            raise overloaded(str(exc)) from None
        except EngineStopped as exc:
            raise overloaded(str(exc), retry_after_s=5) from None
    headers = {
        "X-Seglock-Model": name,
        "X-Seglock-Model-Version": str(hosted.revision),
        "X-Seglock-Key-Version": "" if hosted.key_version is None else str(hosted.key_version),
    }
    async with gate.slot() as slot:  # a full-size mask costs what a decode does
        slot.holds(size[0] * size[1] * (JSON_BYTES_PER_PIXEL if wants_json else 1))
        if wants_json:  # JSON costs far more per byte than a PNG: always a thread
            body = await asyncio.to_thread(inference.mask_json, mask, size, hosted)
            return Response(body, media_type="application/json", headers=headers)
        body = await run_off_loop(size[0] * size[1], inference.mask_png, mask, size)
    return Response(body, media_type="image/png", headers=headers)


def model_input(data: bytes, hosted: HostedModel, settings: Settings, *, encrypted: bool,
                wants_json: bool) -> tuple[torch.Tensor, tuple[int, int], int]:
    """An upload's bytes -> (model input, the size its mask is answered at, the decoded array's
    bytes): decoded and prepared in one hop off the event loop."""
    draft = None if encrypted else tuple(hosted.manifest.input_size)
    upload = decode_upload(data, max_pixels=settings.max_pixels, draft_size=draft)
    if wants_json and upload.size[0] * upload.size[1] > settings.max_json_mask_pixels:
        raise too_large(f"a {upload.size[0]}x{upload.size[1]} mask is too large for JSON "
                        f"(limit {settings.max_json_mask_pixels} pixels): ask for image/png")
    tensor, size = inference.prepare(upload, hosted, encrypted=encrypted)
    return tensor, size, upload.array.nbytes


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

