"""`seglock serve`: run the HTTP server (uvicorn) on a home folder."""

from __future__ import annotations

import argparse
import logging
import os

from pydantic import ValidationError

from seglock.app.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the models of a home folder over HTTP",
        description="Serve protected segmentation models. On an empty --home: make the keystore, "
                    "import the bundled demo models (each re-keyed), and write the first tokens "
                    "to HOME/initial-tokens.json. Flags override SEGLOCK_* environment variables.")
    parser.add_argument("--home", help="home folder (keystore.json, models/); env SEGLOCK_HOME")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    parser.add_argument("--workers", type=int, help="worker processes (default 1)")
    parser.add_argument("--max-batch", type=int, help="largest batch per forward pass (default 8)")
    parser.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill (default 5)")
    parser.add_argument("--queue-size", type=int, help="requests queued per model before 503 (default 64)")
    parser.add_argument("--rate-limit", type=float, metavar="RPS",
                        help="segment requests per second per token, 0 for none (default 0)")
    parser.add_argument("--amp", choices=["auto", "fp16", "bf16", "off"], help="mixed precision on CUDA")
    parser.add_argument("--no-demo", action="store_true", help="do not import the demo models into an empty home")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(handler=run)


_FLAGS = {"home": "HOME", "host": "HOST", "port": "PORT", "device": "DEVICE", "workers": "WORKERS",
          "max_batch": "MAX_BATCH", "max_wait_ms": "MAX_WAIT_MS", "queue_size": "QUEUE_SIZE", "amp": "AMP",
          "rate_limit": "RATE_LIMIT_RPS",
          "log_level": "LOG_LEVEL"}


def run(args: argparse.Namespace) -> int:
    for flag, env in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            os.environ[f"SEGLOCK_{env}"] = str(value)
    if args.no_demo:
        os.environ["SEGLOCK_IMPORT_DEMO"] = "false"
    from seglock.app.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CLIError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    from seglock.models.device import DeviceError, resolve_device

    try:
        resolve_device(settings.device)  # the training policy: refuse a missing device before binding a port
    except DeviceError as exc:
        raise CLIError(str(exc)) from None
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                   timeout_graceful_shutdown=30)
    if settings.workers > 1:
        uvicorn.run("seglock.app.main:create_app", factory=True, workers=settings.workers, **options)
    else:
        from seglock.app.main import create_app

        uvicorn.run(create_app(settings), **options)
    return 0
