"""The `seglock` command line (server side).

Each command group lives in `app/commands/<group>.py` and exposes `register(subparsers)`;
a handler returns an exit code. Exit codes: 0 ok, 2 user error (bad arguments, wrong
master key, missing file), 1 anything else. Errors are one line on stderr.

Handlers do not translate errors: they raise `CLIError` for what they check themselves and let the
parts' own errors through; `main` turns every user error (see `user_error_message`) into one line
and exit code 2, in one place.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Command groups, in the order `seglock --help` lists them.
COMMAND_MODULES = (
    "seglock.app.commands.serve",
    "seglock.app.commands.demo",
    "seglock.app.commands.data",
    "seglock.app.commands.tokens",
    "seglock.app.commands.keystore",
    "seglock.app.commands.train",
    "seglock.app.commands.models",
    "seglock.app.commands.evaluate",
    "seglock.app.commands.attack",
    "seglock.app.commands.report",
)


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


# The parts' errors that are the caller's to fix, as (module, class). An error of a class can only
# exist once its module is imported, so `main` looks them up in sys.modules and imports nothing
# (a command of the SDK-only install must not pull torch to report a mistyped path).
USER_ERROR_TYPES = (
    ("seglock.models.errors", "ModelError"),  # artifacts, data sets, training, evaluation, attacks
    ("seglock.models.keyfile", "KeyFileError"),
    ("seglock.client.transforms.errors", "TransformError"),
    ("seglock.app.errors", "ServiceError"),  # ModelNotFound, ... of the home and the registry
)


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of an error the user can fix (exit code 2), or None for the rest.

    User errors: `CLIError`; errors whose class says `user_error = True` (the keystore's missing
    keystore, wrong master key, unknown token, ...); the classes in `USER_ERROR_TYPES`; a missing
    file; an invalid setting (pydantic's ValidationError, shown as `field: reason`).
    """
    if isinstance(exc, (CLIError, FileNotFoundError)) or getattr(exc, "user_error", False) is True:
        return str(exc)
    for module_name, class_name in USER_ERROR_TYPES:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, getattr(module, class_name)):
            return str(exc)
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(exc, pydantic.ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seglock",
        description="Serve, protect, train and evaluate key-protected segmentation models.",
    )
    from seglock.app import __version__

    parser.add_argument("--version", action="version", version=f"seglock {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


# What a bare `pip install seglock` (the SDK alone) lacks for the server-side commands.
SERVER_EXTRA_MODULES = ("torch", "torchvision", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings",
                        "cryptography", "safetensors", "filelock", "prometheus_client", "tqdm", "multipart")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_EXTRA_MODULES:
            raise
        print(f"seglock: error: the server commands need {exc.name!r}: pip install 'seglock[server]'",
              file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("seglock: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, never a traceback with secrets in locals
        message = user_error_message(exc)
        if message is not None:
            print(f"seglock: error: {message}", file=sys.stderr)
            return 2
        print(f"seglock: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
