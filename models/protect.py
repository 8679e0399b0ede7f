"""Channel permutation (CP, paper 000 §III-C2): keys, train-time CP, and exact post-hoc re-keying.

Convention, paper 000 eq. (7): key K applied to a feature map x gives x'(j) = x(K[j]).
A consumer with weights W reading x computes what one with W[:, K] computes reading x', so
re-indexing every consumer of a tap by K makes the model need K at the tap to be the plain
function again. protect, rekey and fold_key are one re-indexing of the tap's tensors
(`reindex_state_dict`), by an index made from the keys:
    protect with K: K        rekey K -> K': inverse(K)[K']        fold_key K: inverse(K)
index_select only copies numbers, so each result is bit-for-bit the direct computation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from seglock.models.errors import ModelError
from seglock.models.taps import Tap, get_tap

__all__ = [
    "CPKey",
    "KeyedModel",
    "apply_key",
    "fold_key",
    "protect",
    "rekey",
    "rekey_state_dict",
    "reindex_state_dict",
]

_KEY_FORMAT = "seglock-cp-key"
_KEY_VERSION = 1


class CPKey:
    """A secret permutation of a tap's c channels (key space c!); its repr never shows it."""

    __slots__ = ("_perm",)

    def __init__(self, perm: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(perm)
        if arr.ndim != 1 or arr.size < 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ModelError("a CP key must be a 1-D integer permutation of at least 2 channels")
        if not np.array_equal(np.sort(arr), np.arange(arr.size)):
            raise ModelError(f"a CP key must be a permutation of 0..{arr.size - 1}")
        arr = arr.astype(np.int64)
        arr.setflags(write=False)
        self._perm = arr

    @classmethod
    def generate(cls, channels: int) -> CPKey:
        """A uniformly random permutation from the OS CSPRNG (Fisher-Yates with secrets.randbelow)."""
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2:
            raise ModelError(f"a CP key needs at least 2 channels, got {channels!r}")
        perm = list(range(channels))
        for i in range(channels - 1, 0, -1):
            j = secrets.randbelow(i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        return cls(perm)

    @property
    def perm(self) -> np.ndarray:
        """K as a read-only int64 array: x'(j) = x(K[j])."""
        return self._perm

    @property
    def channels(self) -> int:
        return int(self._perm.size)

    @property
    def key_space_log2(self) -> float:
        """log2(c!), the bits of a c-channel key (paper 000 Table I)."""
        return math.lgamma(self.channels + 1) / math.log(2)

    def inverse(self) -> CPKey:
        inv = np.empty_like(self._perm)
        inv[self._perm] = np.arange(self.channels)
        return CPKey(inv)

    def to_dict(self) -> dict[str, Any]:
        return {"format": _KEY_FORMAT, "version": _KEY_VERSION, "perm": self._perm.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CPKey:
        if not isinstance(data, Mapping) or data.get("format") != _KEY_FORMAT:
            raise ModelError(f"not a CP key: expected format {_KEY_FORMAT!r}")
        if data.get("version") != _KEY_VERSION:
            raise ModelError(f"CP key version {data.get('version')!r} is not supported (expected {_KEY_VERSION})")
        perm = data.get("perm")
        if not isinstance(perm, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in perm):
            raise ModelError("CP key field 'perm' must be a list of integers")
        return cls(perm)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> CPKey:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ModelError("a CP key must be JSON") from None
        return cls.from_dict(data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CPKey):
            return NotImplemented
        return np.array_equal(self._perm, other._perm)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CPKey(channels={self.channels})"


class KeyedModel(nn.Module):
    """`model` run with a CP key applied at one tap (paper 000's training with CP in the loop).

    It shares the model's parameters: train it and the model learns; the key is a non-persistent
    buffer, so it is never in a state dict. The permutation is a hook on the producer for the
    length of each forward, so use one KeyedModel per model at a time (not across threads).
    """

    def __init__(self, model: nn.Module, tap: Tap, key: CPKey) -> None:
        super().__init__()
        _check_key(tap, key)
        self.model = model
        self.tap = tap.name
        self._producer = tap.producer
        self.register_buffer("index", torch.from_numpy(key.perm.copy()), persistent=False)

    def _permute(self, module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output.index_select(1, self.index.to(output.device))

    @contextlib.contextmanager
    def _keyed(self) -> Iterator[None]:
        handle = self.model.get_submodule(self._producer).register_forward_hook(self._permute)
        try:
            yield
        finally:
            handle.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._keyed():
            return self.model(x)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._keyed():
            return self.model.forward_train(x)

    def extra_repr(self) -> str:
        return f"tap={self.tap!r}"


def apply_key(model: nn.Module, tap: str, key: CPKey) -> KeyedModel:
    """A module computing `model` with `key` applied at `tap` (differentiable; shares parameters)."""
    return KeyedModel(model, get_tap(model, tap), key)


def protect(model: nn.Module, tap: str, key: CPKey | None = None) -> CPKey:
    """Make a plain model a CP model in place: re-index the tap's consumers by a new key (returned)."""
    found = get_tap(model, tap)
    key = CPKey.generate(found.channels) if key is None else key
    _check_key(found, key)
    _reindex_model(model, found, key.perm)
    return key


def rekey(model: nn.Module, tap: str, key: CPKey, new_key: CPKey | None = None) -> CPKey:
    """Move a CP model from `key` to a new key (returned) in place; the old key stops working."""
    found = get_tap(model, tap)
    new_key = CPKey.generate(found.channels) if new_key is None else new_key
    _check_key(found, key)
    _check_key(found, new_key)
    _reindex_model(model, found, key.inverse().perm[new_key.perm])
    return new_key


def fold_key(model: nn.Module, tap: str, key: CPKey) -> nn.Module:
    """A copy of a CP model with `key` folded into its consumers: a plain model, no gather at run time."""
    found = get_tap(model, tap)
    _check_key(found, key)
    folded = copy.deepcopy(model)
    _reindex_model(folded, found, key.inverse().perm)
    return folded


def reindex_state_dict(state: Mapping[str, torch.Tensor], tap: Tap, index: np.ndarray) -> dict[str, torch.Tensor]:
    """A new state dict whose tap tensors are re-indexed by `index` along their channel dim; pure."""
    order = torch.from_numpy(np.array(index, dtype=np.int64))
    if tuple(order.shape) != (tap.channels,):
        raise ModelError(f"an index for tap {tap.name!r} needs {tap.channels} entries, got {tuple(order.shape)}")
    result = dict(state)
    for name, dim in tap.tensors:
        if name not in state:
            raise ModelError(f"the state dict has no tensor {name!r} for tap {tap.name!r}")
        tensor = state[name]
        if tensor.ndim <= dim or tensor.shape[dim] != tap.channels:
            raise ModelError(f"{name} has shape {tuple(tensor.shape)}, not {tap.channels} channels on dim {dim}")
        result[name] = tensor.index_select(dim, order.to(tensor.device))
    return result


def rekey_state_dict(
    state: Mapping[str, torch.Tensor], tap: Tap, key: CPKey, new_key: CPKey
) -> dict[str, torch.Tensor]:
    """The state dict of a CP model moved from `key` to `new_key`, without building the model."""
    _check_key(tap, key)
    _check_key(tap, new_key)
    return reindex_state_dict(state, tap, key.inverse().perm[new_key.perm])


def _reindex_model(model: nn.Module, tap: Tap, index: np.ndarray) -> None:
    state = model.state_dict()
    updated = reindex_state_dict(state, tap, index)
    with torch.no_grad():
        for name, _ in tap.tensors:
            state[name].copy_(updated[name])


def _check_key(tap: Tap, key: CPKey) -> None:
    if not isinstance(key, CPKey):
        raise ModelError(f"expected a CPKey, got {type(key).__name__}")
    if key.channels != tap.channels:
        raise ModelError(f"the key has {key.channels} channels but tap {tap.name!r} has {tap.channels}")
