"""The protection modes and the model-name rule: the vocabulary every layer shares.

Lives in the SDK (the lowest layer: numpy, Pillow, httpx, pyffx only) so that the client, the
training code, the keystore and the server all import the same names. `Mode` is a `StrEnum`: a
member equals, hashes and JSON-serialises as its stored string, so manifests written before it
existed read and write byte for byte the same.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

__all__ = ["MODEL_NAME_RULE", "Mode", "check_model_name", "is_model_name"]


class Mode(StrEnum):
    """A model's protection mode, as stored in artifact manifests and served by `GET /v1/models`."""

    NONE = "none"  # an unprotected model
    CP = "cp"  # channel permutation after a tap layer (paper 000): the key stays on the server
    SHF = "shf"  # block-wise pixel shuffling (paper 001)
    NP = "np"  # block-wise negative/positive transform (paper 001)
    FFX = "ffx"  # block-wise format-preserving Feistel encryption (paper 001)
    PER_IMAGE = "per-image"  # a fresh block key per image (paper 003): nothing for the server to keep

    @property
    def is_block(self) -> bool:
        """shf, np, ffx: one block key, held by the client, encrypts every input."""
        return self in _BLOCK

    @property
    def is_keyed(self) -> bool:
        """Every mode but none: the model is only useful with the right key (or per-image encryption)."""
        return self is not Mode.NONE

    @property
    def has_model_key(self) -> bool:
        """cp, shf, np, ffx: the model has one long-lived key, kept in the server's keystore.

        per-image is keyed too, but its keys live and die with each image: there is none to keep.
        """
        return self is Mode.CP or self in _BLOCK

    @property
    def encrypts_input(self) -> bool:
        """The client encrypts the image before it is sent: the block modes and per-image."""
        return self in _BLOCK or self is Mode.PER_IMAGE

    @classmethod
    def block_modes(cls) -> tuple[Mode, ...]:
        """shf, np, ffx in declaration order."""
        return tuple(m for m in cls if m.is_block)

    @classmethod
    def parse(cls, value: Any) -> Mode | None:
        """The mode named `value`, or None when `value` names no mode."""
        try:
            return cls(value)
        except ValueError:
            return None


_BLOCK = frozenset({Mode.SHF, Mode.NP, Mode.FFX})

# A model name is a folder name on the server and a path segment in URLs: it starts with a letter
# or digit and has at most 64 characters of letters, digits, '.', '_' and '-'.
MODEL_NAME_RULE = "1-64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_model_name(name: Any) -> bool:
    """True when `name` is a string that follows the model-name rule."""
    return isinstance(name, str) and _MODEL_NAME.fullmatch(name) is not None


def check_model_name(name: Any) -> str:
    """`name` unchanged when it follows the model-name rule; ValueError naming the rule otherwise."""
    if not is_model_name(name):
        raise ValueError(f"invalid model name {name!r}: use {MODEL_NAME_RULE}")
    checked: str = name
    return checked
