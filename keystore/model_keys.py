"""Model keys: per model, a list of versions, each pending -> active -> retiring -> destroyed.

Kinds: "cp" (channel permutation, paper 000; material `seglock.models.protect.CPKey.to_dict()`:
version 2 `{"format": "seglock-cp-key", "version": 2, "taps": {"enc1": [...], "dec1": [...]}}`, one
permutation per tap; records of version 1, `{..., "version": 1, "perm": [...]}`, still open) and
"block" (shf/np/ffx, paper 001; material `seglock.client.transforms.BlockKey.to_dict()`: method,
block size, permutation, FFX password). Per-image models (paper 003) have no stored key.
A destroyed version keeps its metadata (so version numbers are never reused) but not its material.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from seglock.client.modes import Mode
from seglock.keystore.errors import InvalidRecord

KINDS = ("cp", "block")
STATES = ("pending", "active", "retiring", "destroyed")
BLOCK_METHODS = Mode.block_modes()


@dataclass(frozen=True)
class KeyVersion:
    """One version of a model's key; `material` (the secret) is never shown in repr."""

    model: str
    version: int
    id: str
    kind: str
    state: str
    created_at: float
    activated_at: float | None = None
    retired_at: float | None = None
    destroyed_at: float | None = None
    created_by: str | None = None
    material: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def public_dict(self) -> dict[str, Any]:
        """Everything but the material."""
        return {
            "model": self.model,
            "version": self.version,
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "created_at": self.created_at,
            "activated_at": self.activated_at,
            "retired_at": self.retired_at,
            "destroyed_at": self.destroyed_at,
            "created_by": self.created_by,
        }

    def to_json(self) -> dict[str, Any]:
        data = self.public_dict()
        del data["model"]
        data["material"] = self.material
        return data

    @cached_property
    def json_text(self) -> str:
        """`to_json()` as compact JSON, made once (a 2048-channel CP key is worth not re-encoding)."""
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, model: str, data: dict[str, Any]) -> KeyVersion:
        return cls(model=model, **data)


def new_key_id() -> str:
    """A random, non-secret id naming one key version (manifests record it)."""
    return "k" + secrets.token_hex(6)


def checked_material(kind: str, material: Any) -> dict[str, Any]:
    """A private JSON copy of `material`, after the checks its kind needs."""
    if kind not in KINDS:
        raise InvalidRecord(f"unknown key kind {kind!r}: kinds are {', '.join(KINDS)}")
    if not isinstance(material, dict) or not material:
        raise InvalidRecord(f"{kind} key material must be a non-empty dict")
    try:
        copy: dict[str, Any] = json.loads(json.dumps(material, allow_nan=False))
    except (TypeError, ValueError):
        raise InvalidRecord(f"{kind} key material must be JSON-serialisable (str keys, plain values)") from None
    if kind == "cp":
        if "taps" in copy:
            taps = copy["taps"]
            if copy.get("version") != 2 or not isinstance(taps, dict) or not taps:
                raise InvalidRecord("cp key material version 2 needs 'taps': tap name -> permutation")
            if not all(_is_permutation(perm) for perm in taps.values()):
                raise InvalidRecord("cp key material 'taps' must map each tap to a permutation of 0..c-1 with c >= 2")
        elif not _is_permutation(copy.get("perm")):
            raise InvalidRecord("cp key material needs 'perm': a permutation of 0..c-1 with c >= 2")
    else:
        if copy.get("method") not in BLOCK_METHODS:
            raise InvalidRecord(f"block key material needs 'method', one of {', '.join(BLOCK_METHODS)}")
        size = copy.get("block_size")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise InvalidRecord("block key material needs 'block_size', a positive integer")
        if copy["method"] == Mode.FFX and not (isinstance(copy.get("password"), str) and copy["password"]):
            raise InvalidRecord("ffx key material needs 'password', a non-empty string")
    return copy


def _is_permutation(perm: Any) -> bool:
    return (
        isinstance(perm, list)
        and len(perm) >= 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in perm)
        and sorted(perm) == list(range(len(perm)))
    )
