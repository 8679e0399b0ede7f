"""The `seglock` command line (server side).

Each command group lives in `app/commands/<group>.py` and exposes `register(subparsers)`;
a handler returns an exit code. Exit codes: 0 ok, 2 user error (bad arguments, wrong
master key, missing file), 1 anything else. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

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
    except CLIError as exc:
        print(f"seglock: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seglock: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line, never a traceback with secrets in locals
        print(f"seglock: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
