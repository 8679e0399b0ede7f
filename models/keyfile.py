"""Offline key files: a model key as a plain secret on disk, for the CLI's offline commands.

    {"format": "seglock-key", "format_version": 1, "kind": "cp" | "block",
     "model": "<name>" | null, "material": {...CPKey.to_dict() or BlockKey.to_dict()...}}

CP material is version 2 (`{"format": "seglock-cp-key", "version": 2, "taps": {tap: perm, ...}}`);
files holding version 1 material (`"perm": [...]`, one tap named by the model's manifest) still read.

A key file is not encrypted (DESIGN "Model artifact"): it is written 0600 from its creation,
atomically (temp file in the same folder, fsync, rename, fsync of the folder), and never over
an existing file unless asked. Errors name the file and never quote its contents.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seglock.client import fsio
from seglock.client.modes import is_model_name
from seglock.client.transforms import BlockKey, TransformError
from seglock.models.errors import ModelError
from seglock.models.protect import CPKey

__all__ = ["FORMAT", "FORMAT_VERSION", "KeyFile", "KeyFileError", "key_kind", "read_key_file", "write_key_file"]

FORMAT = "seglock-key"
FORMAT_VERSION = 1
KINDS = ("cp", "block")
_FIELDS = {"format", "format_version", "kind", "model", "material"}
_MAX_BYTES = 1 << 20  # a key file is a few kB; refuse to read anything huge


class KeyFileError(ValueError):
    """A key file that cannot be written or read as one (missing, unreadable, malformed, wrong format)."""


@dataclass(frozen=True)
class KeyFile:
    """A key read from a key file; its repr names the kind and model, never the material."""

    kind: str
    model: str | None
    key: CPKey | BlockKey = field(repr=False)
    path: Path | None = None


def key_kind(key: CPKey | BlockKey) -> str:
    """"cp" or "block" (the keystore's kinds)."""
    if isinstance(key, CPKey):
        return "cp"
    if isinstance(key, BlockKey):
        return "block"
    raise KeyFileError(f"a key file holds a CPKey or a BlockKey, not {type(key).__name__}")


def write_key_file(path: str | os.PathLike[str], key: CPKey | BlockKey, *, model: str | None = None,
                   overwrite: bool = False) -> Path:
    """Write `key` to `path` (0600 from creation, atomic); returns the path."""
    path = Path(path)
    kind = key_kind(key)
    if model is not None and not is_model_name(model):
        raise KeyFileError(f"key file {path}: model name must be 1-64 letters, digits or . _ -")
    if path.is_dir():
        raise KeyFileError(f"key file {path} is a directory")
    if path.exists() and not overwrite:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it")
    if not path.parent.is_dir():
        raise KeyFileError(f"key file {path}: folder {path.parent} does not exist")
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "model": model,
                "material": key.to_dict()}
    payload = (json.dumps(document, indent=1) + "\n").encode("utf-8")
    try:
        if overwrite:
            fsio.write_atomic(path, payload, mode=fsio.SECRET_FILE_MODE)
        elif not fsio.atomic_create(path, payload, mode=fsio.SECRET_FILE_MODE):
            # link() failed: the name was taken meanwhile; no silent replacement of another key.
            raise KeyFileError(f"key file {path} already exists; refusing to overwrite it")
    except OSError as exc:
        raise KeyFileError(f"key file {path}: cannot write it ({exc.strerror})") from None
    return path


def read_key_file(path: str | os.PathLike[str]) -> KeyFile:
    """The key in a key file; KeyFileError naming the file for anything else."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read ({exc.strerror})") from None
    if len(raw) > _MAX_BYTES:
        raise KeyFileError(f"key file {path} is too large to be a seglock key file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyFileError(f"key file {path} is not JSON") from None
    return _parse(path, data)


def _parse(path: Path, data: Any) -> KeyFile:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KeyFileError(f"key file {path} is not a {FORMAT} file (no \"format\": \"{FORMAT}\")")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        shown = version if isinstance(version, int) else type(version).__name__
        raise KeyFileError(f"key file {path} has format_version {shown}; this seglock reads {FORMAT_VERSION}")
    unknown = sorted(set(data) - _FIELDS)
    missing = sorted(_FIELDS - set(data))
    if missing or unknown:
        raise KeyFileError(f"key file {path} is malformed: fields missing {missing or 'none'}, "
                           f"unknown {unknown or 'none'}")
    kind, model, material = data["kind"], data["model"], data["material"]
    if kind not in KINDS:
        raise KeyFileError(f"key file {path} is malformed: kind must be one of {', '.join(KINDS)}")
    if model is not None and not is_model_name(model):
        raise KeyFileError(f"key file {path} is malformed: model must be null or a model name")
    try:
        key = CPKey.from_dict(material) if kind == "cp" else BlockKey.from_dict(material)
    except (ModelError, TransformError, TypeError, ValueError):
        # The parsers' messages may echo values; say only which file and what kind failed.
        raise KeyFileError(f"key file {path} is malformed: its material is not a valid {kind} key") from None
    return KeyFile(kind=kind, model=model, key=key, path=path)

