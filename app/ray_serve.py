"""seglock on Ray Serve: the same FastAPI app as `seglock serve`, as a Ray Serve deployment.

Each replica builds the app from the settings (`create_app`, the same auth, per-model batching,
metrics and error handling) when Ray starts it, so nothing unpicklable crosses to the replica;
Ray Serve's proxy routes HTTP to the replicas. Replicas on several hosts share the keystore
(use PostgreSQL: `SEGLOCK_KEYSTORE_URL`) and the models root (a shared volume).

    seglock serve --engine ray --replicas 2                 # a local Ray, or RAY_ADDRESS's cluster
    serve run deploy/ray/serve.yaml                          # the same from a config file

`app_builder(args)` is the `serve run` entry point (`seglock.app.ray_serve:app_builder`); its
args are Settings fields (`home`, `device`, ...) plus `replicas`, `num_gpus`, `num_cpus`,
`max_ongoing_requests` and `autoscaling` (Ray Serve's autoscaling_config, which replaces `replicas`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from fastapi import FastAPI
from ray import serve

from seglock.app.settings import Settings

log = logging.getLogger("seglock.ray")

DEPLOYMENT_NAME = "seglock"
APP_NAME = "seglock"
# Settings travel to the replicas through Ray (runtime_env and the pickled deployment, both kept in
# Ray's control store and shown by its dashboard), so secrets never do: the master key and the
# keystore URL come from each node's own environment (a local Ray's workers inherit the driver's),
# or better from files the `_FILE` variables name (mounted Secrets).
SECRET_VARIABLES = ("SEGLOCK_MASTER_KEY", "SEGLOCK_MASTER_PASSPHRASE", "SEGLOCK_NEW_MASTER_KEY",
                    "SEGLOCK_NEW_MASTER_PASSPHRASE", "SEGLOCK_KEYSTORE_URL")


def _build_app(settings: Settings) -> FastAPI:
    from seglock.app.main import create_app

    return create_app(settings)


def deployment(settings: Settings, *, replicas: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
               max_ongoing_requests: int | None = None, autoscaling: dict[str, Any] | None = None):
    """The bound Ray Serve application serving `settings`' models with the FastAPI ingress."""
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    # Requests beyond what the batcher queues are refused with 503 by the app itself; let Ray
    # hand each replica enough at once to fill its batches.
    options["max_ongoing_requests"] = max_ongoing_requests or max(settings.queue_size, 2 * settings.max_batch)

    settings = settings.model_copy(update={"keystore_url": None})  # replicas read it from their env

    @serve.deployment(name=DEPLOYMENT_NAME, **options)
    @serve.ingress(lambda: _build_app(settings))
    class SegLock:
        pass

    return SegLock.bind()


def runtime_env() -> dict[str, Any]:
    """The driver's SEGLOCK_* settings for every replica, secrets left out (see SECRET_VARIABLES)."""
    return {"env_vars": {k: v for k, v in os.environ.items()
                         if k.startswith("SEGLOCK_") and k not in SECRET_VARIABLES}}


def app_builder(args: dict[str, Any]):
    """`serve run seglock.app.ray_serve:app_builder home=/srv/seglock replicas=2`, or a config file's args."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    num_gpus = float(args.pop("num_gpus", 0))
    num_cpus = float(args.pop("num_cpus", 1))
    max_ongoing = args.pop("max_ongoing_requests", None)
    autoscaling = args.pop("autoscaling", None)
    settings = Settings(**args)
    return deployment(settings, replicas=replicas, num_gpus=num_gpus, num_cpus=num_cpus,
                      max_ongoing_requests=int(max_ongoing) if max_ongoing else None, autoscaling=autoscaling)


def start(settings: Settings, *, replicas: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
          ray_address: str | None = None, ray_num_cpus: int | None = None):
    """Start (or join) Ray, start Serve's proxy on settings.host:port, and deploy; returns the handle."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, num_cpus=ray_num_cpus, runtime_env=runtime_env(),
                 include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(deployment(settings, replicas=replicas, num_gpus=num_gpus, num_cpus=num_cpus),
                     name=APP_NAME, route_prefix="/")


def run_forever(settings: Settings, *, replicas: int, num_gpus: float) -> None:
    """`seglock serve --engine ray`: serve until SIGINT/SIGTERM, then shut Serve down."""
    import ray

    start(settings, replicas=replicas, num_gpus=num_gpus, ray_address=os.environ.get("RAY_ADDRESS"))
    log.warning("serving on http://%s:%d with %d Ray Serve replica(s)", settings.host, settings.port, replicas)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
