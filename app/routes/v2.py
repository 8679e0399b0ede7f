"""Open Inference Protocol (KServe v2) REST beside /v1, so Triton and KServe clients can call seglock.

Same tokens, scopes, grants, rate limits, batcher and metrics as /v1; errors are the protocol's
`{"error": "<message>"}` with the /v1 status codes. Input: a UINT8 NHWC tensor named `image`
(UINT16 for ffx-encrypted input); outputs: `mask` (UINT8 class indices, N×H×W) and, when asked
for, `score` (FP32 softmax probability of each pixel's class). Images a client encrypted itself
(block and per-image models) are declared in the request's `parameters` as `{"encrypted": true}`,
with `"key_version": N` for block models; key material never travels here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from seglock.app import __version__, inference, oip
from seglock.app.deps import ReadyDep, RegistryDep, SegmentGrant, SettingsDep, UploadGateDep
from seglock.app.engine import EngineStopped, Overloaded
from seglock.app.errors import (
    APIError,
    ServiceError,
    bad_request,
    conflict,
    error_responses,
    http_status,
    not_found,
    overloaded,
    too_large,
    unprocessable,
)
from seglock.app.imageio import UploadGate, resize_mask
from seglock.app.offload import run_off_loop
from seglock.app.registry import HostedModel, Registry
from seglock.app.routes.segment import hosted_for
from seglock.app.settings import Settings
from seglock.client.modes import Mode
from seglock.keystore.errors import InvalidRecord, KeystoreError
from seglock.keystore.tokens import Grant

log = logging.getLogger("seglock.app")

EXTENSIONS = ["binary_tensor_data"]


class ProtocolRoute(APIRoute):
    """Answers every error of a /v2 route, its dependencies (auth) included, as `{"error": "..."}`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as exc:
                return protocol_error(exc.status, exc.message, exc.headers)
            except ServiceError as exc:  # domain errors: unknown model, stale key version, ...
                return protocol_error(http_status(exc)[0], str(exc))
            except KeystoreError as exc:
                if isinstance(exc, InvalidRecord):  # a field of the caller's request; says nothing of the server
                    return protocol_error(400, str(exc))
                # Anything else is the server's (as on /v1): paths and the master key's source stay in its log.
                log.error("keystore error: %s", exc)
                return protocol_error(503, "the keystore cannot be used right now", {"Retry-After": "5"})
            except StarletteHTTPException as exc:  # e.g. the body-size limit, raised while the body streams in
                return protocol_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
            except RequestValidationError:
                return protocol_error(422, "the request does not match this endpoint")

        return route_handler


def protocol_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=ProtocolRoute)


def protocol_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, with the protocol's `{"error": "..."}` body."""
    schema = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    return {status: {"description": description, "content": {"application/json": {"schema": schema}}}
            for status, description in ((s, error_responses(s)[s]["description"]) for s in statuses)}


_MODEL_ERRORS = protocol_responses(401, 403, 404, 429, 503)


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "seglock", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: every model loaded", responses=protocol_responses(503))
async def ready(is_ready: ReadyDep) -> JSONResponse:
    if not is_ready:
        return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"ready": True})


@router.get("/models/{name}", summary="Model metadata", responses=_MODEL_ERRORS)
async def model_metadata(name: str, registry: RegistryDep, principal: SegmentGrant) -> dict:
    return metadata(await served(registry, name, None, principal))


@router.get("/models/{name}/versions/{version}", summary="Model metadata of one version", responses=_MODEL_ERRORS)
async def version_metadata(name: str, version: str, registry: RegistryDep, principal: SegmentGrant) -> dict:
    return metadata(await served(registry, name, version, principal))


@router.get("/models/{name}/ready", summary="Model readiness", responses=_MODEL_ERRORS)
async def model_ready(name: str, registry: RegistryDep, principal: SegmentGrant, is_ready: ReadyDep) -> JSONResponse:
    return readiness(await served(registry, name, None, principal), is_ready)


@router.get("/models/{name}/versions/{version}/ready", summary="Readiness of one model version",
            responses=_MODEL_ERRORS)
async def version_ready(name: str, version: str, registry: RegistryDep, principal: SegmentGrant,
                        is_ready: ReadyDep) -> JSONResponse:
    return readiness(await served(registry, name, version, principal), is_ready)


def readiness(hosted: HostedModel, is_ready: bool) -> JSONResponse:
    if not is_ready:
        return JSONResponse({"name": hosted.name, "ready": False}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"name": hosted.name, "ready": True})


_TENSOR = {
    "type": "object", "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"const": oip.INPUT_NAME},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 4, "maxItems": 4},
        "datatype": {"enum": sorted(oip.INPUT_DTYPES)},
        "data": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 65535}},
        "parameters": {"type": "object"},
    },
}
_INFER_BODY = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
                "outputs": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"enum": sorted(oip.OUTPUTS)}, "parameters": {"type": "object"}}}},
                "parameters": {"type": "object"},
            }}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "JSON header + binary tensors "
                                                               "(Inference-Header-Content-Length)"}},
    }},
    "responses": {"200": {"content": {"application/json": {}, "application/octet-stream": {}},
                          "description": "mask (and score) tensors"}},
}


_INFER_ERRORS = protocol_responses(400, 401, 403, 404, 409, 413, 422, 429, 503)


@router.post("/models/{name}/infer", summary="Segment a batch of images", openapi_extra=_INFER_BODY,
             response_class=Response, responses=_INFER_ERRORS)
async def infer(name: str, request: Request, registry: RegistryDep, settings: SettingsDep, gate: UploadGateDep,
                principal: SegmentGrant) -> Response:
    return await run_infer(name, None, request, registry, settings, gate, principal)


@router.post("/models/{name}/versions/{version}/infer", summary="Segment with one model version",
             openapi_extra=_INFER_BODY, response_class=Response, responses=_INFER_ERRORS)
async def infer_version(name: str, version: str, request: Request, registry: RegistryDep, settings: SettingsDep,
                        gate: UploadGateDep, principal: SegmentGrant) -> Response:
    return await run_infer(name, version, request, registry, settings, gate, principal)


async def run_infer(name: str, version: str | None, request: Request, registry: Registry, settings: Settings,
                    gate: UploadGate, principal: Grant) -> Response:
    hosted = await served(registry, name, version, principal)
    # As on /v1: the body is read, parsed and turned into model inputs only inside an upload slot,
    # so however many clients send at once, a worker holds at most `decode_concurrency` bodies.
    with hosted.batcher.arriving() as arrival:  # a batch being collected waits for this request's images
        async with gate.slot() as slot:
            body = await request.body()
            slot.holds(len(body))
            binary_length = request.headers.get(oip.HEADER_LENGTH)
            parsed = await run_off_loop(  # JSON (no binary part) costs far more per byte: always a thread
                len(body) if binary_length is not None else None, oip.parse_request, body, binary_length,
                max_pixels=settings.max_pixels, max_images=settings.queue_size,
                max_json_bytes=settings.max_json_tensor_bytes)
            del body
            json_pixels = parsed.json_output_pixels()
            if json_pixels > settings.max_json_mask_pixels:
                raise too_large(f"{json_pixels} output pixels are too many for JSON (limit "
                                f"{settings.max_json_mask_pixels}): ask for binary_data outputs")
            encrypted = encrypted_input(parsed.parameters, hosted)
            slot.holds(parsed.image.nbytes)
            tensors, size = await run_off_loop(parsed.image.nbytes, model_inputs, parsed.image, hosted, encrypted)
            answer_nbytes = parsed.answer_nbytes()
            parsed.image = parsed.image[:0]  # the upload is not needed any more; the answer's size is in `size`
        try:
            last = len(tensors) - 1  # the jobs are queued in order: arriving until the last one is
            results = await asyncio.gather(*(hosted.batcher.submit_scored(t, score=parsed.wants_score,
                                                                          arrival=arrival if i == last else None)
                                             for i, t in enumerate(tensors)))
        except Overloaded as exc:
            raise overloaded(str(exc)) from None
        except EngineStopped as exc:
            raise overloaded(str(exc), retry_after_s=5) from None
    async with gate.slot() as slot:  # full-size masks (and scores) cost what a decode does
        slot.holds(answer_nbytes)
        payload, header_length = await run_off_loop(None if json_pixels else answer_nbytes, answer, parsed, results,
                                                    size, hosted)
    headers = {"X-Seglock-Key-Version": "" if hosted.key_version is None else str(hosted.key_version)}
    if header_length is None:
        return Response(payload, media_type="application/json", headers=headers)
    headers[oip.HEADER_LENGTH] = str(header_length)
    return Response(payload, media_type="application/octet-stream", headers=headers)


async def served(registry: Registry, name: str, version: str | None, principal: Grant) -> HostedModel:
    """The hosted model a token may use (403 alike for unknown and ungranted names, as on /v1); a
    version, when named, must be the revision being served."""
    hosted = await hosted_for(registry, name, principal)
    if version is not None and version != str(hosted.revision):
        raise not_found(f"model {name} serves version {hosted.revision}, not {version!r}")
    return hosted


def metadata(hosted: HostedModel) -> dict[str, Any]:
    height, width = hosted.manifest.input_size
    runner = hosted.batcher.runner
    return {
        "name": hosted.name,
        "versions": [str(hosted.revision)],
        "platform": "seglock",
        "inputs": [{"name": oip.INPUT_NAME, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [{"name": "mask", "datatype": "UINT8", "shape": [-1, -1, -1]},
                    {"name": "score", "datatype": "FP32", "shape": [-1, -1, -1]}],
        "parameters": {
            "protection": str(hosted.mode),
            "key_version": hosted.key_version,
            "input_size": [height, width],  # encrypted input must be exactly this size
            "class_names": list(hosted.manifest.class_names),
            "backend": runner.backend,  # eager | channels_last | fused | script | compile (see --backend)
            "max_batch": hosted.batcher.max_batch,  # largest batch per forward pass (see --tune-batch)
            "compile": None if runner.compile_job is None else runner.compile_job.state,
        },
    }


def encrypted_input(parameters: dict[str, Any], hosted: HostedModel) -> bool:
    """Whether the client encrypted the image; block inputs must name the current key version."""
    flag = parameters.get("encrypted", False)
    key_version = parameters.get("key_version")
    if not isinstance(flag, bool):
        raise bad_request("parameters.encrypted must be true or false")
    encrypted = flag or key_version is not None
    if not encrypted:
        return False
    if not hosted.mode.encrypts_input:
        raise bad_request(f"model {hosted.name} is {hosted.mode}: send a plain image")
    if hosted.mode.is_block:
        if key_version is None:
            raise conflict(f"encrypted input for {hosted.name} needs parameters.key_version "
                           f"(current: {hosted.key_version})")
        if not isinstance(key_version, int) or isinstance(key_version, bool):
            raise conflict(f"parameters.key_version must be an integer (current: {hosted.key_version})")
        if key_version != hosted.key_version:
            raise conflict(f"key version {key_version} is stale; the current key version of {hosted.name} is "
                           f"{hosted.key_version}: fetch the client key again")
    return True


def model_inputs(images: np.ndarray, hosted: HostedModel, encrypted: bool):
    """NHWC array -> (one CHW model input per image, the H×W the masks are answered at); the same
    preprocessing as /v1, so the masks are byte-identical to its."""
    if encrypted:
        height, width = hosted.manifest.input_size
        if images.shape[1:3] != (height, width):
            raise unprocessable(f"encrypted input must be exactly {height}x{width} (HxW), "
                                f"got {images.shape[1]}x{images.shape[2]}")
        if hosted.mode is Mode.FFX:
            if images.dtype != np.uint16 or int(images.max(initial=0)) > inference.FFX_MAX:
                raise unprocessable(f"ffx input must be UINT16 with values 0..{inference.FFX_MAX}")
        elif images.dtype != np.uint8:
            raise unprocessable(f"{hosted.mode} input must be UINT8")
        return [inference.to_tensor(image, hosted) for image in images], images.shape[1:3]
    if images.dtype != np.uint8:
        raise unprocessable("a plain image must be UINT8; UINT16 is for ffx-encrypted input")
    return [inference.to_tensor(inference.plain_to_model_array(image, hosted), hosted)
            for image in images], images.shape[1:3]


def answer(parsed: oip.InferRequest, results, size: tuple[int, int], hosted: HostedModel):
    height, width = int(size[0]), int(size[1])
    arrays = {"mask": np.stack([resize_mask(mask, (height, width)) for mask, _ in results])}
    if parsed.wants_score:
        arrays["score"] = np.stack([resize_score(score, (height, width)) for _, score in results])
    return oip.encode_response(
        model_name=hosted.name, model_version=str(hosted.revision), request_id=parsed.id,
        outputs=[(requested, arrays[requested.name]) for requested in parsed.outputs],
        parameters={"key_version": hosted.key_version} if hosted.key_version is not None else None)


def resize_score(score: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scores follow their mask: the same nearest-neighbour pixel map (Pillow's, on a float image)."""
    from PIL import Image

    height, width = size
    if score.shape == (height, width):
        return score
    return np.asarray(Image.fromarray(score.astype(np.float32)).resize((width, height), Image.NEAREST))
