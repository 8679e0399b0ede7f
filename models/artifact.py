"""Model artifacts: a directory holding manifest.json + weights.safetensors (no pickle, no key material).

manifest.json, format_version 1:
    {
      "format_version": 1,
      "name": "streets-cp",
      "architecture": {"name": "tiny", "kwargs": {"width": 16, "in_channels": 3}},
      "num_classes": 5,
      "class_names": ["background", "road", "car", "person", "sky"],
      "input_size": [128, 128],                                     # [H, W]
      "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
      "protection": {"mode": "cp", "tap": "dec2", "channels": 16},  # mode + public parameters
      "key": {"id": "streets-cp", "version": 3},                    # or null
      "weights": {"file": "weights.safetensors", "sha256": "<hex>", "bytes": 123456},
      "created": "2025-01-01T00:00:00+00:00",
      "seglock_version": "0.1.0"
    }
Protection modes and their required public parameters: none; cp: tap (channels is filled in);
shf, np, ffx: block_size; per-image: block_size, sub_block. Other public parameters may be added,
but no field may be named like key material (key, perm, secret, password, seed, token, ...) or hold
a long list of integers: saving and loading refuse such a manifest.

Inside a home the weights file is encrypted at rest (`seglock.models.at_rest`; `save_artifact(...,
seal=)`, `load_artifact(..., unseal=)`, given by `seglock.app.home.Home`); the manifest is the same
and its sha256/bytes describe the plain safetensors bytes. Elsewhere artifacts are plain files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file
from torch import nn

from seglock.client import fsio
from seglock.client.modes import Mode, is_model_name
from seglock.models.architectures import build_model, list_architectures
from seglock.models.architectures.weights import load_state_exactly
from seglock.models.at_rest import is_sealed
from seglock.models.errors import ArtifactError, ModelError
from seglock.models.protect import join_taps, resolve_taps

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PROTECTION_MODES",
    "WEIGHTS_FILE",
    "KeyRef",
    "Manifest",
    "WeightsRef",
    "load_artifact",
    "read_manifest",
    "save_artifact",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

# Required public parameters of each protection mode (DESIGN "Protection modes").
PROTECTION_MODES: dict[Mode, dict[str, type]] = {
    Mode.NONE: {},
    Mode.CP: {"tap": str},
    Mode.SHF: {"block_size": int},
    Mode.NP: {"block_size": int},
    Mode.FFX: {"block_size": int},
    Mode.PER_IMAGE: {"block_size": int, "sub_block": int},
}
_SECRET_WORDS = ("perm", "secret", "password", "passphrase", "material", "seed", "token", "private", "nonce", "key")
_LONGEST_INT_LIST = 16  # a longer list of integers looks like a permutation: refuse it
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_META_PREFIX = "seglock."
_CHUNK = 1 << 20


@dataclass(frozen=True)
class KeyRef:
    """Which key (by id and version) the weights expect; never the key itself."""

    id: str
    version: int

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _KEY_ID.fullmatch(self.id):
            raise ArtifactError("key id must be 1-128 letters, digits or . _ : -")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ArtifactError(f"key version must be a positive integer, got {self.version!r}")


@dataclass(frozen=True)
class WeightsRef:
    file: str
    sha256: str
    bytes: int

    def __post_init__(self) -> None:
        # A bare file name: a manifest must not point outside its own directory.
        if not isinstance(self.file, str) or self.file != Path(self.file).name or self.file.startswith("."):
            raise ArtifactError(f"weights file must be a plain file name, got {self.file!r}")
        if not self.file.endswith(".safetensors"):
            raise ArtifactError(f"weights file must be .safetensors, got {self.file!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ArtifactError("weights sha256 must be 64 lowercase hex digits")
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes < 0:
            raise ArtifactError(f"weights bytes must be a non-negative integer, got {self.bytes!r}")


@dataclass(frozen=True)
class Manifest:
    """The public description of an artifact; every field is checked at construction."""

    name: str
    architecture: str
    architecture_kwargs: dict[str, Any]
    num_classes: int
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    normalization: dict[str, list[float]]
    protection: dict[str, Any]
    key: KeyRef | None
    weights: WeightsRef
    created: str
    seglock_version: str
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        if isinstance(self.class_names, str) or isinstance(self.input_size, str):
            raise ArtifactError("class_names and input_size must be lists, not strings")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "input_size", tuple(self.input_size))
        _check_manifest(self)

    @property
    def mode(self) -> Mode:
        return Mode(self.protection["mode"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "architecture": {"name": self.architecture, "kwargs": dict(self.architecture_kwargs)},
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "input_size": list(self.input_size),
            "normalization": {k: list(v) for k, v in self.normalization.items()},
            "protection": dict(self.protection),
            "key": None if self.key is None else {"id": self.key.id, "version": self.key.version},
            "weights": {"file": self.weights.file, "sha256": self.weights.sha256, "bytes": self.weights.bytes},
            "created": self.created,
            "seglock_version": self.seglock_version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping):
            raise ArtifactError("a manifest must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"manifest format_version {version!r} is not supported "
                                f"(this seglock reads {FORMAT_VERSION})")
        expected = {"architecture" if f.name == "architecture_kwargs" else f.name for f in fields(cls)}
        missing = sorted(expected - data.keys())
        unknown = sorted(data.keys() - expected)
        if missing or unknown:
            raise ArtifactError(f"manifest fields missing: {missing or 'none'}; unknown: {unknown or 'none'}")
        _refuse_key_material(data)
        arch, key, weights = data["architecture"], data["key"], data["weights"]
        if not isinstance(arch, Mapping) or set(arch) != {"name", "kwargs"} or not isinstance(arch["kwargs"], Mapping):
            raise ArtifactError("manifest 'architecture' must be {name, kwargs}")
        if key is not None and (not isinstance(key, Mapping) or set(key) != {"id", "version"}):
            raise ArtifactError("manifest 'key' must be null or {id, version}")
        if not isinstance(weights, Mapping) or set(weights) != {"file", "sha256", "bytes"}:
            raise ArtifactError("manifest 'weights' must be {file, sha256, bytes}")
        for name in ("class_names", "input_size"):
            if not isinstance(data[name], list):
                raise ArtifactError(f"manifest {name!r} must be a list")
        for name in ("normalization", "protection"):
            if not isinstance(data[name], Mapping):
                raise ArtifactError(f"manifest {name!r} must be an object")
        return cls(
            name=data["name"],
            architecture=arch["name"],
            architecture_kwargs=dict(arch["kwargs"]),
            num_classes=data["num_classes"],
            class_names=data["class_names"],
            input_size=data["input_size"],
            normalization=dict(data["normalization"]),
            protection=dict(data["protection"]),
            key=None if key is None else KeyRef(**key),
            weights=WeightsRef(**weights),
            created=data["created"],
            seglock_version=data["seglock_version"],
            format_version=version,
        )


def _check_manifest(m: Manifest) -> None:
    if not is_model_name(m.name):
        raise ArtifactError("artifact name must be 1-64 letters, digits or . _ - (starting alphanumeric), "
                            f"got {m.name!r}")
    if m.format_version != FORMAT_VERSION:
        raise ArtifactError(f"manifest format_version {m.format_version!r} is not supported")
    if not isinstance(m.architecture, str) or not isinstance(m.architecture_kwargs, dict):
        raise ArtifactError("manifest architecture must be a name and a dict of kwargs")
    if not _is_count(m.num_classes):
        raise ArtifactError(f"num_classes must be a positive integer, got {m.num_classes!r}")
    if len(m.class_names) != m.num_classes or not all(isinstance(c, str) and c for c in m.class_names):
        raise ArtifactError(f"class_names must be {m.num_classes} non-empty strings, got {len(m.class_names)}")
    if len(m.input_size) != 2 or not all(_is_count(s) for s in m.input_size):
        raise ArtifactError(f"input_size must be [H, W] positive integers, got {list(m.input_size)!r}")
    _check_normalization(m.normalization)
    _check_protection(m.protection, m.key)
    if m.key is not None and not isinstance(m.key, KeyRef):
        raise ArtifactError("manifest key must be a KeyRef or None")
    if not isinstance(m.weights, WeightsRef):
        raise ArtifactError("manifest weights must be a WeightsRef")
    try:
        datetime.fromisoformat(m.created)
    except (TypeError, ValueError):
        raise ArtifactError(f"created must be an ISO 8601 time, got {m.created!r}") from None
    if not isinstance(m.seglock_version, str) or not m.seglock_version:
        raise ArtifactError("seglock_version must be a non-empty string")
    _refuse_key_material(m.to_dict())


def _check_normalization(norm: Mapping[str, Any]) -> None:
    if set(norm) != {"mean", "std"}:
        raise ArtifactError("normalization must be {mean, std}")
    mean, std = norm["mean"], norm["std"]
    if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)):
        raise ArtifactError("normalization mean and std must be lists of numbers")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*mean, *std])
    if not numbers or not mean or len(mean) != len(std) or min(std) <= 0:
        raise ArtifactError("normalization mean and std must be equal-length lists of numbers, std > 0")


def _check_protection(protection: Mapping[str, Any], key: KeyRef | None) -> None:
    mode = protection.get("mode")
    if mode not in PROTECTION_MODES:
        raise ArtifactError(f"protection mode must be one of {', '.join(PROTECTION_MODES)}, got {mode!r}")
    for param, kind in PROTECTION_MODES[mode].items():
        value = protection.get(param)
        ok = isinstance(value, str) and bool(value) if kind is str else _is_count(value)
        if not ok:
            raise ArtifactError(f"protection mode {mode!r} needs {param!r} ({kind.__name__}), got {value!r}")
    for param, value in protection.items():
        if not _is_public_value(value):
            raise ArtifactError(f"protection parameter {param!r} must be a JSON scalar or a short list")
    # no key to name: none has none, per-image's live and die with each image
    if not Mode(mode).has_model_key and key is not None:
        raise ArtifactError(f"protection mode {mode!r} has no key to name")


def _refuse_key_material(data: Any, path: str = "") -> None:
    """Refuse any field named like key material, and integer lists long enough to be a key."""
    if isinstance(data, Mapping):
        for name, value in data.items():
            where = f"{path}.{name}" if path else str(name)
            lowered = str(name).lower()
            # The top-level "key" field is the {id, version} reference, checked by KeyRef.
            if where != "key" and any(word in lowered for word in _SECRET_WORDS):
                raise ArtifactError(f"manifest field {where!r} looks like key material; manifests never hold keys")
            _refuse_key_material(value, where)
    elif isinstance(data, (list, tuple)):
        if sum(isinstance(v, int) and not isinstance(v, bool) for v in data) > _LONGEST_INT_LIST:
            raise ArtifactError(f"manifest field {path!r} holds a long integer list, which looks like key material")
        for value in data:
            _refuse_key_material(value, path)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_public_value(value: Any) -> bool:
    scalar = (str, int, float, bool, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def save_artifact(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    class_names: list[str] | tuple[str, ...],
    input_size: tuple[int, int] | list[int],
    normalization: Mapping[str, list[float]] | None = None,
    protection: Mapping[str, Any] | None = None,
    key: KeyRef | Mapping[str, Any] | None = None,
    overwrite: bool = False,
    created: datetime | None = None,
    seal: Callable[[bytes], bytes] | None = None,
) -> Manifest:
    """Write `model` as an artifact directory, atomically (a temp directory renamed into place).

    With `seal` (a home's at-rest encryption, `seglock.models.at_rest`) the safetensors bytes are
    made in memory and only `seal(bytes)` reaches the disk; the manifest still describes the plain
    bytes (sha256, size), which loading checks after decryption.
    """
    for attr in ("architecture", "architecture_kwargs", "num_classes"):
        if not hasattr(model, attr):
            raise ArtifactError("save the model built by models.build_model (not a keyed wrapper or a bare module)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ArtifactError(f"{out_dir} already exists; pass overwrite=True to replace it")
    protection = _public_protection(model, dict(protection or {"mode": "none"}))
    if isinstance(key, Mapping):
        key = KeyRef(**key)
    draft = Manifest(
        name=name,
        architecture=model.architecture,
        architecture_kwargs=dict(model.architecture_kwargs),
        num_classes=model.num_classes,
        class_names=tuple(class_names),
        input_size=tuple(input_size),
        normalization=dict(normalization or IMAGENET_NORMALIZATION),
        protection=protection,
        key=key,
        weights=WeightsRef(WEIGHTS_FILE, "0" * 64, 0),  # replaced once the weights are written
        created=(created or datetime.now(UTC)).isoformat(timespec="seconds"),
        seglock_version=_seglock_version(),
    )
    _check_input_size(draft)
    with fsio.atomic_directory(out_dir, mode=0o755) as tmp:
        weights_path = tmp / WEIGHTS_FILE
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        if seal is None:
            save_file(state, str(weights_path), metadata=_weights_metadata(draft))
            digest, size = _sha256_file(weights_path)
        else:
            plain = save_safetensors(state, metadata=_weights_metadata(draft))
            digest, size = hashlib.sha256(plain).hexdigest(), len(plain)
            weights_path.write_bytes(seal(plain))  # fsynced and swapped in with the folder
            del plain
        manifest = replace(draft, weights=WeightsRef(WEIGHTS_FILE, digest, size))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return manifest


def _public_protection(model: nn.Module, protection: dict[str, Any]) -> dict[str, Any]:
    """Check CP taps against the model; record them in network order with their channel counts (public).

    One tap: {"tap": "dec1", "channels": 64}; several: {"tap": "enc1,dec1", "channels": [32, 64]}.
    """
    if protection.get("mode") == Mode.CP:
        try:
            found = resolve_taps(model, protection.get("tap"))
        except ModelError as exc:
            raise ArtifactError(str(exc)) from None
        channels = found[0].channels if len(found) == 1 else [tap.channels for tap in found]
        if protection.get("channels", channels) != channels:
            raise ArtifactError(f"taps {join_taps(t.name for t in found)!r} have {channels} channels, "
                                f"not {protection['channels']!r}")
        protection["tap"] = join_taps(tap.name for tap in found)
        protection["channels"] = channels
    return protection


def _check_input_size(manifest: Manifest) -> None:
    fixed = manifest.architecture_kwargs.get("image_size")
    if fixed is not None and list(fixed) != list(manifest.input_size):
        raise ArtifactError(f"{manifest.architecture} was built for {list(fixed)} inputs, "
                            f"not {list(manifest.input_size)}")


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The checked manifest of an artifact directory (the weights are not read)."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a model artifact directory")
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST_FILE}")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{MANIFEST_FILE} of {path} is not valid JSON") from None
    try:
        return Manifest.from_dict(data)
    except TypeError as exc:  # a field of the wrong JSON type reaching a dataclass
        raise ArtifactError(f"{MANIFEST_FILE} of {path} is malformed ({exc})") from None
    except ArtifactError as exc:
        raise ArtifactError(f"{MANIFEST_FILE} of {path}: {exc}") from None


def load_artifact(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu",
                  unseal: Callable[[bytes], bytes] | None = None) -> tuple[nn.Module, Manifest]:
    """(model in eval mode, manifest) after checking the manifest and the weights' SHA-256.

    Weights encrypted at rest (a home's revisions) are decrypted in memory by `unseal` (given by
    `seglock.app.home.Home`); without it they are refused with a clear error. Plain weights load
    either way.
    """
    path = Path(path)
    manifest = read_manifest(path)
    weights_path = path / manifest.weights.file
    if not weights_path.is_file():
        raise ArtifactError(f"{path} has no {manifest.weights.file}")
    data = weights_path.read_bytes()  # read once: the bytes hashed are the bytes loaded
    if is_sealed(data):
        if unseal is None:
            raise ArtifactError(
                f"the weights of {path} are encrypted at rest (a seglock home's revision): serve them from "
                "their home, or write a plain artifact with "
                "`seglock models export --model NAME --home HOME --out DIR`"
            )
        data = unseal(data)
    if len(data) != manifest.weights.bytes or hashlib.sha256(data).hexdigest() != manifest.weights.sha256:
        raise ArtifactError(
            f"{manifest.weights.file} of {path} does not match its manifest's SHA-256: "
            "the artifact is corrupt or was altered"
        )
    if manifest.architecture not in list_architectures():
        raise ArtifactError(
            f"manifest of {path} names unknown architecture {manifest.architecture!r}; "
            f"known: {', '.join(list_architectures())}"
        )
    _check_weights_metadata(path, manifest, _safetensors_metadata(data))
    try:
        model = build_model(manifest.architecture, manifest.num_classes, **manifest.architecture_kwargs)
        load_state_exactly(model, load_safetensors(data), "its weights")
        if manifest.mode is Mode.CP:
            _public_protection(model, dict(manifest.protection))
    except (ModelError, SafetensorError) as exc:
        raise ArtifactError(f"artifact {path} does not fit its manifest: {exc}") from None
    return model.to(map_location).eval(), manifest


def _weights_metadata(manifest: Manifest) -> dict[str, str]:
    """What the weights were saved for, stored inside them, so an edited manifest is caught on load."""
    return {
        f"{_META_PREFIX}architecture": manifest.architecture,
        f"{_META_PREFIX}architecture_kwargs": json.dumps(manifest.architecture_kwargs, sort_keys=True),
        f"{_META_PREFIX}num_classes": str(manifest.num_classes),
    }


def _check_weights_metadata(path: Path, manifest: Manifest, metadata: Mapping[str, str]) -> None:
    for name, expected in _weights_metadata(manifest).items():
        saved = metadata.get(name)
        if saved is not None and saved != expected:
            field_name = name[len(_META_PREFIX):]
            raise ArtifactError(
                f"manifest of {path} says {field_name} {expected} but its weights were saved for {saved}"
            )


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file: an 8-byte little-endian header length, then a JSON header."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError("the weights file is not a safetensors file") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return metadata if isinstance(metadata, dict) else {}


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _seglock_version() -> str:
    try:
        return importlib.metadata.version("seglock")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
