"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from seglock.app.errors import forbidden

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once every model is loaded and warmed up")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    if not state.ready:
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
    if not state.keystore.storage.fresh_enough():  # a database keystore out of reach for too long
        return JSONResponse({"status": "keystore_unavailable"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "models": state.registry.names()})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = request.app.state
    if not state.settings.metrics_public:
        raise forbidden("metrics are not public on this server")
    for name in state.registry.names():
        state.metrics.queue_depth.labels(name).set(state.registry.get(name).batcher.depth)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
