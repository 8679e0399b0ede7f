"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from seglock.app.deps import (
    KeystoreDep,
    MetricsDep,
    OptionalAuditorDep,
    OptionalRegistryDep,
    ReadyDep,
    RegistryDep,
    SettingsDep,
)
from seglock.app.errors import documented
from seglock.app.security import authenticate

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once every model is loaded and warmed up")
async def readyz(ready: ReadyDep, registry: OptionalRegistryDep) -> JSONResponse:
    if not ready or registry is None:
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
    if not registry.keystore.storage.fresh_enough():  # a database keystore out of reach for too long
        return JSONResponse({"status": "keystore_unavailable"}, status_code=503, headers={"Retry-After": "5"})
    # how many, not which: model names are for tokens granted them
    return JSONResponse({"status": "ready", "models": len(registry.names())})


@router.get("/metrics", summary="Prometheus metrics (admin tokens, unless SEGLOCK_METRICS_PUBLIC)",
            response_class=Response, responses=documented(401, 403, 503),
            openapi_extra={"security": [{"HTTPBearer": []}, {}]})
async def metrics(request: Request, settings: SettingsDep, metrics: MetricsDep, registry: RegistryDep,
                  keystore: KeystoreDep, auditor: OptionalAuditorDep) -> Response:
    if not settings.metrics_public:  # its labels name every model
        await asyncio.to_thread(authenticate, request, keystore, "admin", None, auditor)

    def render() -> bytes:
        for name in registry.names():
            metrics.queue_depth.labels(name).set(registry.get(name).batcher.depth)
        return metrics.render()

    return Response(await asyncio.to_thread(render), media_type=CONTENT_TYPE_LATEST)
