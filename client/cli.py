"""`seglock-client`: segment images with a seglock server from the command line.

    seglock-client models [--json]
    seglock-client segment IMAGES... --model M --out DIR [--overlay] [--concurrency N] [--json]

Both take --url (env SEGLOCK_URL, default http://127.0.0.1:8000) and --token (env SEGLOCK_TOKEN;
prefer the variable: a flag shows in the process list). Exit codes as in the server CLI: 0 ok,
2 user error (bad arguments, missing file, unreadable image, refused token, unknown model),
1 anything else. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
from PIL import Image

from seglock.client import imaging
from seglock.client.errors import AuthenticationError, InvalidInput, ModelNotFound, PermissionDenied, SegLockError
from seglock.client.sdk import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT, TOKEN_ENV, ModelInfo, SegLockClient

PROG = "seglock-client"
URL_ENV = "SEGLOCK_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
OVERLAY_SUFFIX = "_overlay"
_USER_ERRORS = (InvalidInput, AuthenticationError, PermissionDenied, ModelNotFound)


class CLIError(Exception):
    """A user error: one line on stderr, exit code 2."""


# -- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("server")
    group.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                       help=f"server URL (env {URL_ENV}; default {DEFAULT_URL})")
    group.add_argument("--token", help=f"API token (default: env {TOKEN_ENV}, which keeps it out of the process list)")
    group.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                       help=f"seconds per request (default {DEFAULT_TIMEOUT:g})")
    group.add_argument("--retries", type=int, default=3, help="retries on 503/429/connection failures (default 3)")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Segment images with a seglock server; images for input-encrypted "
                               "models are encrypted here, so the server never sees them in the clear.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = commands.add_parser("models", parents=[connection], help="list the models this token may use",
                                 description="List the models this token may use, with their protection mode.")
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    models.set_defaults(handler=run_models)

    segment = commands.add_parser(
        "segment", parents=[connection], help="segment images and write palette PNG masks",
        description="Segment each image with MODEL and write OUT/<name>.png, a palette PNG whose pixel values "
                    "are class indices (VOC colours). A folder stands for the images in it.")
    segment.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    segment.add_argument("--model", "-m", required=True, help="model name (see `seglock-client models`)")
    segment.add_argument("--out", "-o", required=True, type=Path, help="output folder (made if missing)")
    segment.add_argument("--overlay", action="store_true",
                         help=f"also write OUT/<name>{OVERLAY_SUFFIX}.png: the mask's colours over the image")
    segment.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                         help=f"requests in flight (default {DEFAULT_CONCURRENCY})")
    segment.add_argument("--json", action="store_true", help="print one JSON summary of what was written")
    segment.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    segment.set_defaults(handler=run_segment)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("seglock")
    except Exception:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except CLIError as exc:
        _error(str(exc))
        return 2
    except SegLockError as exc:
        _error(str(exc))
        return exit_code(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line, never a traceback with a token in its locals
        _error(f"{type(exc).__name__}: {exc}")
        return 1


def exit_code(error: SegLockError) -> int:
    """2 for what the user can fix (input, token, model name), 1 for the rest."""
    return 2 if isinstance(error, _USER_ERRORS) else 1


def _error(message: str, file: TextIO | None = None) -> None:
    print(f"{PROG}: error: {message}", file=file or sys.stderr)


def _client(args: argparse.Namespace) -> SegLockClient:
    if args.retries < 0:
        raise CLIError("--retries must not be negative")
    if args.timeout <= 0:
        raise CLIError("--timeout must be positive")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if not token:
        raise CLIError(f"no API token: set {TOKEN_ENV} or pass --token")
    return SegLockClient(args.url, token, timeout=args.timeout, retries=args.retries)


# -- models -------------------------------------------------------------------------------

def run_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = client.models()
    if args.json:
        print(json.dumps([_info_dict(info) for info in infos], indent=2))
        return 0
    rows = [("NAME", "MODE", "INPUT", "CLASSES", "KEY VERSION")]
    rows += [(i.name, i.mode, f"{i.input_size[0]}x{i.input_size[1]}", str(i.num_classes),
              "-" if i.key_version is None else str(i.key_version)) for i in infos]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _info_dict(info: ModelInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data["input_size"] = list(info.input_size)
    data["class_names"] = list(info.class_names)
    return data


# -- segment ------------------------------------------------------------------------------

def expand_images(names: Sequence[str]) -> list[Path]:
    """Files as given, folders as their image files (sorted); CLIError for anything missing."""
    paths: list[Path] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CLIError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise CLIError(f"no such image: {path}")
    return paths


def output_paths(images: Sequence[Path], out: Path) -> list[Path]:
    """OUT/<stem>.png for each image; CLIError if two images would write the same file."""
    targets: dict[Path, Path] = {}
    for image in images:
        target = out / f"{image.stem}.png"
        if target in targets:
            raise CLIError(f"{targets[target]} and {image} would both write {target}: rename one")
        targets[target] = image
    return list(targets)


def run_segment(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise CLIError("--concurrency must be at least 1")
    images = expand_images(args.images)
    targets = output_paths(images, args.out)
    written: list[dict[str, Any] | None] = [None] * len(images)
    failed = 0
    with _client(args) as client:
        class_names = _class_names(client, args.model)
        results = client.iter_segment(images, args.model, concurrency=args.concurrency)
        with contextlib.closing(results), _progress(len(images), quiet=args.quiet or len(images) < 2) as progress:
            for index, result in results:
                if isinstance(result, InvalidInput):  # this image's problem: report it and go on
                    failed += 1
                    progress.write(f"{PROG}: error: {images[index]}: {result}", file=sys.stderr)
                elif isinstance(result, SegLockError):  # the server's or the token's: stop
                    raise result
                else:
                    written[index] = _write(images[index], result, targets[index], args.overlay, class_names)
                progress.update()

    done = [entry for entry in written if entry is not None]
    if args.json:
        print(json.dumps({"model": args.model, "out": str(args.out), "written": done, "failed": failed}, indent=2))
    else:
        print(f"wrote {len(done)} mask{'s' if len(done) != 1 else ''} to {args.out}"
              + (f"; {failed} image{'s' if failed != 1 else ''} failed" if failed else ""))
    return 2 if failed else 0


def _class_names(client: SegLockClient, model: str) -> tuple[str, ...]:
    for info in client.models():
        if info.name == model:
            return info.class_names
    return ()  # not listed: segment() asks the server, which names the reason


def _write(image: Path, mask: np.ndarray, target: Path, with_overlay: bool,
           class_names: Sequence[str]) -> dict[str, Any]:
    try:  # made with the first mask, so that a refused token or model leaves no empty folder behind
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot make {target.parent}: {exc.strerror or exc}") from None
    imaging.mask_image(mask).save(target, format="PNG")
    entry: dict[str, Any] = {"image": str(image), "mask": str(target), "height": int(mask.shape[0]),
                             "width": int(mask.shape[1])}
    if with_overlay:
        overlay_path = target.with_name(f"{target.stem}{OVERLAY_SUFFIX}.png")
        picture = imaging.overlay(imaging.load_rgb(image), mask)
        Image.fromarray(picture).save(overlay_path, format="PNG")
        entry["overlay"] = str(overlay_path)
    counts = {c: int(n) for c, n in enumerate(np.bincount(mask.reshape(-1))) if n}
    entry["pixels"] = {(class_names[c] if c < len(class_names) else str(c)): n for c, n in counts.items()}
    return entry


class _Progress(Protocol):
    """What the segment command needs of a progress bar (tqdm's names)."""

    def update(self, n: int = 1) -> Any: ...

    def write(self, line: str, file: TextIO | None = None) -> Any: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc_info: object) -> Any: ...


class _SimpleProgress:
    """`tqdm`'s interface, as a one-line counter on stderr (used where tqdm is not installed)."""

    def __init__(self, total: int, disable: bool) -> None:
        self.total, self.count, self.disable = total, 0, disable

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.disable:
            print(f"\r{PROG}: {self.count}/{self.total} images", end="", file=sys.stderr, flush=True)

    def write(self, line: str, file: TextIO | None = None) -> None:
        if not self.disable and self.count:
            print(file=sys.stderr)  # end the counter's line first
        print(line, file=file or sys.stderr)

    def __enter__(self) -> _SimpleProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.disable and self.count:
            print(file=sys.stderr)


def _progress(total: int, *, quiet: bool) -> _Progress:
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleProgress(total, quiet)
    bar: _Progress = tqdm(total=total, unit="image", desc=PROG, disable=quiet, file=sys.stderr)
    return bar


if __name__ == "__main__":
    sys.exit(main())
