"""Channel permutation (CP, paper 000 §III-C2): keys, train-time CP, and exact post-hoc re-keying.

Convention, paper 000 eq. (7): key K applied to a feature map x gives x'(j) = x(K[j]).
A consumer with weights W reading x computes what one with W[:, K] computes reading x', so
re-indexing every consumer of a tap by K makes the model need K at the tap to be the plain
function again. protect, rekey and fold_key are one re-indexing of each tap's tensors
(`reindex_state_dict`), by an index made from the keys:
    protect with K: K        rekey K -> K': inverse(K)[K']        fold_key K: inverse(K)
index_select only copies numbers, so each result is bit-for-bit the direct computation.

A key may permute several taps at once (one permutation each; the key space is the product of
the c_i!). Taps never share a re-indexed tensor, so the taps' re-indexings are independent and
their order does not matter. Taps are named `"dec1"`, `"enc1,dec1"`, `["enc1", "dec1"]` or `"all"`.

Key documents: version 2 `{"format": "seglock-cp-key", "version": 2, "taps": {"enc1": [...], ...}}`;
version 1 `{"format": "seglock-cp-key", "version": 1, "perm": [...]}` (one permutation, its tap
named by the model's manifest) still reads, as an *unbound* key that binds to the one tap it is
used with.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from seglock.models.errors import ModelError
from seglock.models.taps import Tap, get_tap, taps

__all__ = [
    "ALL_TAPS",
    "CPKey",
    "KeyedModel",
    "apply_key",
    "bind_key",
    "fold_key",
    "join_taps",
    "protect",
    "protection_channels",
    "protection_taps",
    "rekey",
    "rekey_state_dict",
    "reindex_state_dict",
    "resolve_taps",
]

_KEY_FORMAT = "seglock-cp-key"
_KEY_VERSION = 2
_READABLE_VERSIONS = (1, 2)
ALL_TAPS = "all"
_TAP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

TapSpec = str | Iterable[str] | None


def _checked_perm(perm: Sequence[int] | np.ndarray, where: str = "") -> np.ndarray:
    arr = np.asarray(perm)
    if arr.ndim != 1 or arr.size < 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ModelError(f"a CP key{where} must be a 1-D integer permutation of at least 2 channels")
    if not np.array_equal(np.sort(arr), np.arange(arr.size)):
        raise ModelError(f"a CP key{where} must be a permutation of 0..{arr.size - 1}")
    arr = arr.astype(np.int64)
    arr.setflags(write=False)
    return arr


def _random_perm(channels: int) -> np.ndarray:
    """A uniformly random permutation from the OS CSPRNG (Fisher-Yates with secrets.randbelow)."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2:
        raise ModelError(f"a CP key needs at least 2 channels, got {channels!r}")
    perm = list(range(channels))
    for i in range(channels - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return _checked_perm(perm)


class CPKey:
    """A secret CP key: a permutation per tap (key space the product of the c_i!); its repr never shows one.

    `CPKey({"enc1": perm1, "dec1": perm2})` names its taps (bound). `CPKey(perm)` is one permutation
    whose tap the model names (unbound, as version 1 key documents are); it binds to the one tap it is
    used with.
    """

    __slots__ = ("_perms", "_bound")

    def __init__(self, perms: Mapping[str, Sequence[int] | np.ndarray] | Sequence[int] | np.ndarray) -> None:
        if isinstance(perms, CPKey):
            self._perms, self._bound = perms._perms, perms._bound
            return
        if isinstance(perms, Mapping):
            if not perms:
                raise ModelError("a CP key needs at least one tap")
            checked = {}
            for name, perm in perms.items():
                if not isinstance(name, str) or not _TAP_NAME.fullmatch(name):
                    raise ModelError("a CP key's tap names must be 1-64 letters, digits or _ . -")
                checked[name] = _checked_perm(perm, f" (tap {name!r})")
            self._perms, self._bound = checked, True
        else:
            self._perms, self._bound = {"": _checked_perm(perms)}, False

    @classmethod
    def generate(cls, channels: int | Mapping[str, int]) -> CPKey:
        """A random key: one permutation of `channels` (unbound), or one per tap of {tap: channels}."""
        if isinstance(channels, Mapping):
            return cls({name: _random_perm(c) for name, c in channels.items()})
        return cls(_random_perm(channels))

    @classmethod
    def for_model(cls, model: nn.Module, tap_spec: TapSpec) -> CPKey:
        """A random key for the named taps of `model`."""
        return cls.generate({tap.name: tap.channels for tap in resolve_taps(model, tap_spec)})

    # -- what the key is ----------------------------------------------------------------------------

    @property
    def bound(self) -> bool:
        """Whether the key names its taps (version 2) or is one permutation for the model's tap (version 1)."""
        return self._bound

    @property
    def taps(self) -> tuple[str, ...]:
        """The taps this key permutes (empty for an unbound key)."""
        return tuple(self._perms) if self._bound else ()

    def __len__(self) -> int:
        return len(self._perms)

    def __getitem__(self, tap: str) -> np.ndarray:
        if not self._bound and len(self._perms) == 1:
            return self._perms[""]
        if tap not in self._perms:
            raise ModelError(f"the key has no permutation for tap {tap!r}; its taps: {', '.join(self._perms)}")
        return self._perms[tap]

    @property
    def perm(self) -> np.ndarray:
        """K of a one-tap key as a read-only int64 array: x'(j) = x(K[j])."""
        return self._single("perm")

    @property
    def channels(self) -> int:
        """c of a one-tap key."""
        return int(self._single("channels").size)

    @property
    def tap_channels(self) -> dict[str, int]:
        """{tap: c} (for an unbound key, {"": c})."""
        return {name: int(p.size) for name, p in self._perms.items()}

    def _single(self, what: str) -> np.ndarray:
        if len(self._perms) != 1:
            raise ModelError(f"the key permutes {len(self._perms)} taps ({', '.join(self._perms)}): "
                             f"ask for one tap's {what} with key[tap]")
        return next(iter(self._perms.values()))

    @property
    def key_space_log2(self) -> float:
        """log2 of the product of the c_i!: the bits of the key (paper 000 Table I, per tap, multiplied)."""
        return sum(math.lgamma(p.size + 1) for p in self._perms.values()) / math.log(2)

    def inverse(self) -> CPKey:
        inverted = {}
        for name, perm in self._perms.items():
            inv = np.empty_like(perm)
            inv[perm] = np.arange(perm.size)
            inverted[name] = inv
        return CPKey(inverted) if self._bound else CPKey(inverted[""])

    def bind(self, names: Sequence[str]) -> CPKey:
        """This key for exactly the taps `names`: an unbound key binds to a single tap; a bound one must match."""
        names = tuple(names)
        if not self._bound:
            if len(names) != 1:
                raise ModelError(f"a one-permutation (version 1) key fits one tap, not {len(names)} "
                                 f"({', '.join(names)})")
            return CPKey({names[0]: self._perms[""]})
        if set(names) != set(self._perms):
            raise ModelError(f"the key permutes taps {', '.join(self._perms)}, but taps {', '.join(names)} "
                             "were asked for")
        return CPKey({name: self._perms[name] for name in names})

    def subset(self, names: Iterable[str]) -> CPKey:
        """The bound key restricted to some of its taps."""
        return CPKey({name: self[name] for name in names})

    # -- documents ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Version 2 (tap -> permutation); an unbound key keeps its version 1 document."""
        if not self._bound:
            return {"format": _KEY_FORMAT, "version": 1, "perm": self._perms[""].tolist()}
        return {"format": _KEY_FORMAT, "version": _KEY_VERSION,
                "taps": {name: perm.tolist() for name, perm in self._perms.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CPKey:
        if not isinstance(data, Mapping) or data.get("format") != _KEY_FORMAT:
            raise ModelError(f"not a CP key: expected format {_KEY_FORMAT!r}")
        version = data.get("version")
        if version not in _READABLE_VERSIONS or isinstance(version, bool):
            raise ModelError(f"CP key version {version!r} is not supported (this seglock reads 1 and 2)")
        if version == 1:
            return cls(_int_list(data.get("perm"), "perm"))
        perms = data.get("taps")
        if not isinstance(perms, Mapping) or not perms:
            raise ModelError("CP key field 'taps' must map tap names to permutations")
        return cls({name: _int_list(perm, f"taps.{name}") for name, perm in perms.items()})

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
        if not (self._bound and other._bound):  # a version 1 key is the same key as a one-tap key with its permutation
            return (len(self._perms) == len(other._perms) == 1
                    and np.array_equal(next(iter(self._perms.values())), next(iter(other._perms.values()))))
        return self._perms.keys() == other._perms.keys() and all(
            np.array_equal(p, other._perms[n]) for n, p in self._perms.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if not self._bound:
            return f"CPKey(channels={self.channels})"
        return f"CPKey(taps={self.tap_channels})"


def _int_list(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ModelError(f"CP key field {field!r} must be a list of integers")
    return value


# -- tap names -------------------------------------------------------------------------------------


def resolve_taps(model: nn.Module, tap_spec: TapSpec) -> list[Tap]:
    """The taps a spec names, in network order: "dec1", "enc1,dec1", ["enc1", "dec1"] or "all"."""
    found = taps(model)
    if tap_spec is None:
        raise ModelError(f"name the taps to key: one or more of {', '.join(found)}, or 'all'")
    names = _split(tap_spec)
    if names == [ALL_TAPS]:
        return list(found.values())
    if not names:
        raise ModelError(f"no tap named; {model.architecture}'s taps: {', '.join(found)}, or 'all'")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelError(f"tap {duplicates[0]!r} is named twice")
    for name in names:
        if name not in found:
            get_tap(model, name)  # the one message naming the model's taps
    return [tap for name, tap in found.items() if name in names]


def _split(tap_spec: str | Iterable[str]) -> list[str]:
    if isinstance(tap_spec, str):
        return [part.strip() for part in tap_spec.split(",") if part.strip()]
    if isinstance(tap_spec, Tap):
        return [tap_spec.name]
    names = []
    for item in tap_spec:
        if isinstance(item, Tap):
            names.append(item.name)
        elif isinstance(item, str):
            names.extend(_split(item))
        else:
            raise ModelError(f"a tap is named by a string, not {type(item).__name__}")
    return names


def join_taps(names: Iterable[str]) -> str:
    """The manifest's spelling of a tap set: names in network order, joined by commas."""
    return ",".join(names)


def protection_taps(protection: Mapping[str, Any]) -> tuple[str, ...]:
    """The tap names of a cp manifest's protection ("tap": "dec1" or "enc1,dec1")."""
    spec = protection.get("tap")
    if not isinstance(spec, str) or not spec:
        raise ModelError("a cp protection names its taps in 'tap'")
    return tuple(_split(spec))


def protection_channels(protection: Mapping[str, Any]) -> dict[str, int]:
    """{tap: channels} of a cp manifest's protection ("channels": 64, or [32, 64] for several taps)."""
    names = protection_taps(protection)
    channels = protection.get("channels")
    counts = [channels] if isinstance(channels, int) and not isinstance(channels, bool) else channels
    if not isinstance(counts, list) or len(counts) != len(names):
        raise ModelError(f"a cp protection needs 'channels' for each of its taps {', '.join(names)}")
    return dict(zip(names, counts, strict=False))


def _pairs(model: nn.Module, tap_spec: TapSpec, key: CPKey) -> list[tuple[Tap, np.ndarray]]:
    """(tap, permutation) for each tap named (or, with no spec, each tap of a bound key)."""
    if not isinstance(key, CPKey):
        raise ModelError(f"expected a CPKey, got {type(key).__name__}")
    if tap_spec is None:
        if not key.bound:
            raise ModelError("a one-permutation (version 1) key needs its tap named")
        tap_spec = list(key.taps)
    found = resolve_taps(model, tap_spec)
    bound = key.bind([tap.name for tap in found])
    pairs = []
    for tap in found:
        perm = bound[tap.name]
        if perm.size != tap.channels:
            raise ModelError(f"the key has {perm.size} channels but tap {tap.name!r} has {tap.channels}")
        pairs.append((tap, perm))
    return pairs


def bind_key(model: nn.Module, tap_spec: TapSpec, key: CPKey) -> CPKey:
    """`key` bound to the named taps of `model` (ModelError if it does not fit them)."""
    return CPKey({tap.name: perm for tap, perm in _pairs(model, tap_spec, key)})


# -- CP in the loop --------------------------------------------------------------------------------


class KeyedModel(nn.Module):
    """`model` run with a CP key applied at its taps (paper 000's training with CP in the loop).

    It shares the model's parameters: train it and the model learns; the key is a set of
    non-persistent buffers, so it is never in a state dict. The permutations are hooks on the
    producers for the length of each forward, so use one KeyedModel per model at a time (not across
    threads).
    """

    def __init__(self, model: nn.Module, tap: Tap | Sequence[Tap], key: CPKey,
                 perms: Sequence[np.ndarray] | None = None) -> None:
        super().__init__()
        found = [tap] if isinstance(tap, Tap) else list(tap)
        if perms is None:
            bound = key.bind([t.name for t in found])
            perms = [bound[t.name] for t in found]
        for t, perm in zip(found, perms, strict=False):
            _check_perm(t, perm)
        self.model = model
        self.taps = tuple(t.name for t in found)
        self.tap = join_taps(self.taps)
        self._producers = tuple(t.producer for t in found)
        for i, perm in enumerate(perms):
            self.register_buffer(f"index{i}", torch.from_numpy(np.array(perm)), persistent=False)

    def _permuter(self, i: int):
        def permute(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            index = getattr(self, f"index{i}")
            return output.index_select(1, index.to(output.device))
        return permute

    @contextlib.contextmanager
    def _keyed(self) -> Iterator[None]:
        handles = []
        try:
            for i, producer in enumerate(self._producers):
                handles.append(self.model.get_submodule(producer).register_forward_hook(self._permuter(i)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._keyed():
            return self.model(x)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._keyed():
            return self.model.forward_train(x)

    def extra_repr(self) -> str:
        return f"tap={self.tap!r}"


def apply_key(model: nn.Module, tap: TapSpec, key: CPKey) -> KeyedModel:
    """A module computing `model` with `key` applied at its taps (differentiable; shares parameters)."""
    pairs = _pairs(model, tap, key)
    return KeyedModel(model, [t for t, _ in pairs], key, [p for _, p in pairs])


# -- re-keying -------------------------------------------------------------------------------------


def protect(model: nn.Module, tap: TapSpec, key: CPKey | None = None) -> CPKey:
    """Make a plain model a CP model in place: re-index the taps' consumers by a new key (returned)."""
    key = CPKey.for_model(model, tap) if key is None else key
    pairs = _pairs(model, tap, key)
    _reindex_model(model, [(t, perm) for t, perm in pairs])
    return CPKey({t.name: perm for t, perm in pairs})


def rekey(model: nn.Module, tap: TapSpec, key: CPKey, new_key: CPKey | None = None) -> CPKey:
    """Move a CP model from `key` to a new key (returned) in place; the old key stops working."""
    old = _pairs(model, tap, key)
    new_key = CPKey.generate({t.name: t.channels for t, _ in old}) if new_key is None else new_key
    new = dict((t.name, p) for t, p in _pairs(model, [t.name for t, _ in old], new_key))
    _reindex_model(model, [(t, _inverse(perm)[new[t.name]]) for t, perm in old])
    return CPKey(new)


def fold_key(model: nn.Module, tap: TapSpec, key: CPKey) -> nn.Module:
    """A copy of a CP model with `key` folded into its consumers: a plain model, no gather at run time."""
    pairs = _pairs(model, tap, key)
    folded = copy.deepcopy(model)
    _reindex_model(folded, [(t, _inverse(perm)) for t, perm in pairs])
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
    state: Mapping[str, torch.Tensor], tap: Tap | Sequence[Tap], key: CPKey, new_key: CPKey
) -> dict[str, torch.Tensor]:
    """The state dict of a CP model moved from `key` to `new_key`, without building the model."""
    found = [tap] if isinstance(tap, Tap) else list(tap)
    names = [t.name for t in found]
    old, new = key.bind(names), new_key.bind(names)
    result = dict(state)
    for t in found:
        _check_perm(t, old[t.name])
        _check_perm(t, new[t.name])
        result = reindex_state_dict(result, t, _inverse(old[t.name])[new[t.name]])
    return result


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv


def _reindex_model(model: nn.Module, pairs: Sequence[tuple[Tap, np.ndarray]]) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for tap, index in pairs:
            updated = reindex_state_dict(state, tap, index)
            for name, _ in tap.tensors:
                state[name].copy_(updated[name])


def _check_perm(tap: Tap, perm: np.ndarray) -> None:
    if np.asarray(perm).size != tap.channels:
        raise ModelError(f"the key has {np.asarray(perm).size} channels but tap {tap.name!r} has {tap.channels}")
