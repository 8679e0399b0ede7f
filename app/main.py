"""The FastAPI application: `create_app(settings)` wires keystore, registry, engine and routes.

`seglock serve` runs it under uvicorn; `--workers N` imports `seglock.app.main:worker_app` as a factory
in each worker, with the settings passed through `SEGLOCK_*` variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from seglock.app import __version__, memory
from seglock.app.audit import Auditor
from seglock.app.backends import set_threads, use_compile_cache
from seglock.app.bootstrap import first_start
from seglock.app.errors import error_response, install_error_handlers
from seglock.app.imageio import UploadGate
from seglock.app.middleware import RequestMiddleware
from seglock.app.observability import Metrics, configure_logging
from seglock.app.ratelimit import RateLimiter
from seglock.app.registry import Registry
from seglock.app.routes import account, admin, console, health, segment, v2
from seglock.app.settings import Settings
from seglock.keystore import Keystore
from seglock.keystore.errors import InvalidRecord, KeystoreError
from seglock.models.device import resolve_device

log = logging.getLogger("seglock.app")


def worker_app() -> FastAPI:
    """The app of one `seglock serve --workers N` process: its settings from the environment the
    command set, and its own logging (a spawned process has none: its access log, audit warnings
    and backend choices would otherwise be lost)."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(start, app, settings, metrics)
        try:
            yield
        finally:
            app.state.ready = False
            await asyncio.to_thread(app.state.registry.close)

    app = FastAPI(title="seglock", version=__version__, lifespan=lifespan,
                  description="Segmentation models that answer only to granted tokens.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    app.state.upload_gate = UploadGate(settings.decode_concurrency, settings.decode_queue)
    app.state.rate_limiter = (RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
                              if settings.rate_limit_rps > 0 else None)
    install_error_handlers(app)

    @app.exception_handler(KeystoreError)
    async def _keystore_error(_: Request, exc: KeystoreError) -> JSONResponse:
        if isinstance(exc, InvalidRecord):  # a field of the caller's request; says nothing of the server
            return error_response(400, "bad_request", str(exc))
        # Anything else is the server's: paths and the master key's source stay in the server's log.
        log.error("keystore error: %s", exc)
        return error_response(503, "keystore_unavailable", "the keystore cannot be used right now",
                              {"Retry-After": "5"})

    # A request is matched against the routes in this order, one by one: the inference routes first
    # (trying the 17 health, account, admin and console routes before /v2 infer cost it 57 us).
    app.include_router(segment.router)
    app.include_router(v2.router)
    app.include_router(health.router)
    app.include_router(account.router)
    app.include_router(admin.router)
    app.include_router(console.router)
    app.add_middleware(RequestMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       max_small_body_bytes=settings.max_json_body_bytes)
    return app


def open_keystore(settings: Settings) -> Keystore:
    """The server's keystore, made (with its home) if missing."""
    home = Path(settings.home)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys and tokens live here: private from the start
    url = settings.keystore_url.get_secret_value() if settings.keystore_url else None
    return Keystore.open(home, create=True, url=url, lock_timeout=settings.keystore_lock_timeout_s)


def start(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Open (or make) the keystore, set up a new home, load and warm up every model."""
    set_threads(settings.threads)
    memory.tune_malloc()
    home = Path(settings.home)
    keystore = open_keystore(settings)
    keystore.refresh()  # a database keystore starts following other hosts' writes now
    use_compile_cache(Path(settings.compile_cache) if settings.compile_cache else home / "cache" / "compile")
    tokens_path = first_start(home, keystore, import_demo=settings.import_demo, models_root=settings.models_root,
                              token_ttl_s=settings.initial_token_ttl_s)
    if tokens_path is not None:
        log.warning("initial tokens written to %s (mode 0600): read them there", tokens_path)
    registry = Registry(settings, keystore, metrics, resolve_device(settings.device))
    registry.load_all()
    app.state.keystore = keystore
    app.state.registry = registry
    app.state.auditor = Auditor(keystore, window_s=settings.audit_window_s)
    app.state.audit = app.state.auditor.best_effort  # deps.AuditDep: (grant, action, target, outcome)
    app.state.ready = True
    log.info("ready: %d models on %s", len(registry.names()), registry.device)

