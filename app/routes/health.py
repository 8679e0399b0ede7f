"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from seglock.app.errors import documented
from seglock.app.security import authenticate

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once every model is loaded and warmed up")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    if not state.ready:
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
    # how many, not which: model names are for tokens granted them
    return JSONResponse({"status": "ready", "models": len(state.registry.names())})


@router.get("/metrics", summary="Prometheus metrics (admin tokens, unless SEGLOCK_METRICS_PUBLIC)",
            response_class=Response, responses=documented(401, 403, 503),
            openapi_extra={"security": [{"HTTPBearer": []}, {}]})
async def metrics(request: Request) -> Response:
    state = request.app.state
    if not state.settings.metrics_public:  # its labels name every model
        await asyncio.to_thread(authenticate, request, "admin")
    return Response(await asyncio.to_thread(_render, state), media_type=CONTENT_TYPE_LATEST)


def _render(state) -> bytes:
    for name in state.registry.names():
        state.metrics.queue_depth.labels(name).set(state.registry.get(name).batcher.depth)
    return state.metrics.render()
