"""`seglock serve`: run the HTTP server (uvicorn) on a home folder.

Every field of `seglock.app.settings.Settings` is a flag, made from the field itself: `max_batch`
becomes `--max-batch` with the field's type, choices, description and default, so `--help` cannot
drift from the settings. A flag overrides the field's `SEGLOCK_*` variable; a flag not given leaves
the variable (or the default) in force. Booleans have a `--no-` form.
"""

from __future__ import annotations

import argparse
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import SecretStr

# Flag names kept from before the flags were generated: field -> extra option strings.
ALIASES = {"rate_limit_rps": ("--rate-limit",), "import_demo": ("--demo",),  # --demo gives --no-demo
           "compile_budget_s": ("--compile-budget",), "keystore_url": ("--keystore",)}
ENV_PREFIX = "SEGLOCK_"


def flag_of(field: str) -> str:
    return "--" + field.replace("_", "-")


def register(subparsers: argparse._SubParsersAction) -> None:
    from seglock.app.settings import Settings

    parser = subparsers.add_parser(
        "serve", help="serve the models of a home folder over HTTP",
        description="Serve protected segmentation models. On an empty --home: make the keystore, "
                    "import the bundled demo models (each re-keyed), and write the first tokens "
                    f"to HOME/initial-tokens.json. Each flag overrides its {ENV_PREFIX}* environment variable "
                    "(shown with the default).")
    group = parser.add_argument_group("settings")
    for name, field in Settings.model_fields.items():
        add_setting_flag(group, name, field)
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine", choices=["uvicorn", "ray"], default="uvicorn",
                        help="uvicorn (default): this host's processes; ray: replicas on Ray Serve, on a local "
                             "Ray or the cluster RAY_ADDRESS names (needs seglock[ray])")
    engine.add_argument("--replicas", type=int, default=1, metavar="N", help="Ray Serve replicas (default 1)")
    engine.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G",
                        help="GPUs Ray reserves for each replica (default 0; 1 on GPU hosts)")
    parser.set_defaults(handler=run)


def add_setting_flag(parser: argparse._ActionsContainer, name: str, field: Any) -> None:
    """One flag for a pydantic field: its type (bool: --x/--no-x; Literal: choices), help and default."""
    env = f"{ENV_PREFIX}{name.upper()}"
    options = [flag_of(name), *ALIASES.get(name, ())]
    default = field.get_default(call_default_factory=True)
    shown = str(default).lower() if isinstance(default, bool) else str(default)
    help_text = f"{field.description or name.replace('_', ' ')} (default: {shown}; env {env})".replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
    annotation = field.annotation
    optional = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(optional) == 1:
        annotation = optional[0]  # an optional setting: the flag gives the value
    if annotation is SecretStr:
        annotation = str
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(annotation) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    elif annotation in (int, float, str, Path):
        kwargs["type"] = annotation
        kwargs["metavar"] = name.upper()
    else:  # a new field of another type needs a rule here
        raise TypeError(f"setting {name}: no command-line flag for type {annotation!r}")
    parser.add_argument(*options, **kwargs)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (field name -> value)."""
    from seglock.app.settings import Settings

    return {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}


def settings_from_args(args: argparse.Namespace):
    """Settings from the flags over the `SEGLOCK_*` environment; pydantic's ValidationError if invalid."""
    from seglock.app.settings import Settings

    return Settings(**flag_values(args))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from seglock.app.cli import CLIError
    from seglock.app.settings import thread_environment, threads_per_worker, usable_cores

    settings = settings_from_args(args)  # an invalid value: pydantic's ValidationError, one line from `main`
    workers = settings.workers if args.engine == "uvicorn" else 1
    cores = usable_cores()
    threads = threads_per_worker(settings.threads, workers, cores, os.environ)
    os.environ.update(thread_environment(threads))  # before torch loads: every thread, every worker
    from seglock.models.device import resolve_device

    resolve_device(settings.device)  # the training policy: refuse a missing device before binding a port
    for name, value in flag_values(args).items():  # worker processes (--workers N) read the environment
        os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    from seglock.app.observability import configure_logging

    configure_logging(settings.log_level)
    if threads != settings.threads:
        logging.getLogger("seglock.app").info("%d workers, %d torch thread(s) each (--threads 0: the %d cores shared)",
                                              workers, threads, cores)
    check_keystore(settings)
    if args.engine == "ray":
        if args.replicas < 1 or args.gpus_per_replica < 0:
            raise CLIError("--replicas must be at least 1 and --gpus-per-replica at least 0")
        try:
            from seglock.app import ray_serve
        except ModuleNotFoundError as exc:
            raise CLIError(f"--engine ray needs {exc.name!r}: pip install 'seglock[ray]'") from None
        ray_serve.run_forever(settings, replicas=args.replicas, num_gpus=args.gpus_per_replica)
        return 0

    # a worker busy loading and compiling on a loaded machine must not miss uvicorn's 5 s ping and be restarted
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                   timeout_graceful_shutdown=30, timeout_worker_healthcheck=120)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    logging.getLogger("seglock.app").info("web console: http://%s:%d/ui", host, settings.port)
    if settings.workers > 1:
        run_workers(settings, options)
    else:
        from seglock.app.main import create_app

        uvicorn.run(create_app(settings), **options)
    return 0


def check_keystore(settings) -> None:
    """Open the keystore once here, before any worker starts: what the operator can fix (a wrong or
    malformed master key, a damaged keystore, a database that refuses) then stops the command with
    its one-line message (exit 2), not with a traceback from every worker's startup. A new home's
    keystore is made here, as the first worker would have made it."""
    from seglock.app.main import open_keystore

    open_keystore(settings).close()


def run_workers(settings, options: dict[str, Any]) -> None:
    """`--workers N`: uvicorn's supervisor (health pings, restarts, signals) over N processes, each
    listening on a socket of its own on the port (`seglock.app.listen`), so connections are spread
    over the workers rather than taken by the first one awake."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from seglock.app import listen
    from seglock.app.cli import CLIError

    if not listen.supported():  # no SO_REUSEPORT (Windows): the workers share uvicorn's one socket
        uvicorn.run("seglock.app.main:worker_app", factory=True, workers=settings.workers, **options)
        return
    try:
        sock = listen.reuse_port_socket(settings.host, settings.port)
    except OSError as exc:
        raise CLIError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    config = uvicorn.Config("seglock.app.main:worker_app", factory=True, workers=settings.workers, **options)
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
