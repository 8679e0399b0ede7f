"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from seglock.app.deps import MetricsDep, OptionalRegistryDep, ReadyDep, RegistryDep, SettingsDep
from seglock.app.errors import forbidden

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
    return JSONResponse({"status": "ready", "models": registry.names()})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(settings: SettingsDep, metrics: MetricsDep, registry: RegistryDep) -> Response:
    if not settings.metrics_public:
        raise forbidden("metrics are not public on this server")
    for name in registry.names():
        metrics.queue_depth.labels(name).set(registry.get(name).batcher.depth)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
