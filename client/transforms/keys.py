"""Block keys for SHF, NP and FFX (paper 001), and the key -> index maths shared with training.

A key is one permutation of the M*M*3 positions of a block vector (one key for all blocks,
001_1d6747102c10f252.txt section 2.3); NP and FFX select the positions where
`key > len(key) / 2`, the reference code's rule; FFX adds a password for its Feistel cipher.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from seglock.client.modes import Mode
from seglock.client.transforms import ffx as _ffx
from seglock.client.transforms.errors import TransformError
from seglock.client.transforms.geometry import CHANNELS, block_vector_index, check_block_size
from seglock.client.transforms.randomness import RandBytes, random_permutations

METHODS = Mode.block_modes()  # the methods a BlockKey can have: shf, np, ffx
KEY_FORMAT = "seglock-block-key"
KEY_FORMAT_VERSION = 1
_CACHE_LIMIT = 16  # (height, width) layouts kept per key: a few image sizes in practice

# Paper 001 section 2.4: inputs are divided by the largest value the encryption can produce
# (plain and CP models see plain 8-bit images).
_INPUT_SCALE: dict[str, int] = {mode.value: _ffx.FFX_MAX if mode is Mode.FFX else 255 for mode in Mode}


def input_scale(method: str) -> int:
    """The divisor that maps a model input of protection mode `method` to [0, 1]."""
    try:
        return _INPUT_SCALE[method]
    except KeyError:
        raise TransformError(f"unknown method {method!r}; expected one of {sorted(_INPUT_SCALE)}") from None


def reference_permutation(seed: int, length: int) -> np.ndarray:
    """int64[length]: `torch.manual_seed(seed); torch.randperm(length)` computed without torch.

    torch's CPU randperm draws 32-bit words from an MT19937 seeded with the low 32 bits of the
    seed and swaps r[i] with r[i + word % (length - i)]; numpy's legacy RandomState is the same
    MT19937. Only the reference-import path may use this seeded generator.
    """
    if length < 1:
        raise TransformError(f"permutation length must be positive, got {length}")
    state = np.random.RandomState(seed & 0xFFFFFFFF)
    words = state.randint(0, 2**32, size=length - 1, dtype=np.uint32).tolist()
    perm = list(range(length))
    for i, word in enumerate(words):
        j = i + word % (length - i)
        perm[i], perm[j] = perm[j], perm[i]
    return np.array(perm, dtype=np.int64)


class BlockKey:
    """A secret block-wise transformation key: method, block size M, permutation, FFX password.

    `repr` and `str` show the method, block size and a random non-secret tag, never the material.
    """

    __slots__ = (
        "_method", "_block_size", "_perm", "_password", "_tag", "_cache", "_lock", "_material_digest", "__weakref__",
    )

    def __init__(
        self,
        method: str,
        block_size: int,
        permutation: Any,
        password: str | None = None,
        *,
        tag: str | None = None,
    ) -> None:
        _check_method(method)
        block_size = check_block_size(block_size)
        length = block_size * block_size * CHANNELS
        perm = _as_int_vector(permutation)
        if perm is None or perm.size != length or not _is_permutation(perm):
            raise TransformError(
                f"key permutation must be a permutation of range({length}) for block size {block_size}"
            )
        if method == Mode.FFX:
            if not isinstance(password, str) or not password:
                raise TransformError("an ffx key needs a non-empty password string")
        elif password is not None:
            raise TransformError(f"a password applies only to ffx keys, not {method!r}")
        if tag is None:
            tag = secrets.token_hex(4)
        elif not isinstance(tag, str) or not tag.isalnum() or len(tag) > 32:
            raise TransformError("key tag must be a short alphanumeric string")
        perm.flags.writeable = False
        self._method = Mode(method).value  # a plain str: reprs and key files stay as they were
        self._block_size = block_size
        self._perm = perm
        self._password = password
        self._tag = tag
        self._cache: dict[tuple[Any, ...], np.ndarray] = {}
        self._lock = threading.Lock()  # keys are shared across threads (server workers, loaders)
        material = f"{method}|{block_size}|{password or ''}|".encode() + perm.tobytes()
        self._material_digest = hashlib.sha256(material).digest()  # for __eq__/__hash__ only

    # -- construction -------------------------------------------------------------------

    @classmethod
    def generate(cls, method: str, block_size: int, *, randbytes: RandBytes = os.urandom) -> BlockKey:
        """A fresh key: permutation and (for ffx) password from the OS CSPRNG."""
        _check_method(method)
        block_size = check_block_size(block_size)
        length = block_size * block_size * CHANNELS
        perm = random_permutations(1, length, randbytes)[0]
        password = randbytes(16).hex() if method == Mode.FFX else None
        return cls(method, block_size, perm, password)

    @classmethod
    def from_reference(
        cls, method: str, block_size: int, seed: int, password: str | None = None
    ) -> BlockKey:
        """The key the published reference code builds from `seed` (and `password` for ffx)."""
        _check_method(method)
        block_size = check_block_size(block_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -(2**63) <= seed < 2**64:
            raise TransformError("seed must be an integer in torch.manual_seed's range")
        if method == Mode.FFX and password is None:
            password = "password"  # the reference code's default, used in paper 001
        return cls(method, block_size, reference_permutation(int(seed), block_size * block_size * CHANNELS), password)

    # -- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict holding the key material (a secret: store it as one)."""
        data: dict[str, Any] = {
            "format": KEY_FORMAT,
            "version": KEY_FORMAT_VERSION,
            "method": self._method,
            "block_size": self._block_size,
            "channels": CHANNELS,
            "permutation": self._perm.tolist(),
            "tag": self._tag,
        }
        if self._password is not None:
            data["password"] = self._password
        return data

    @classmethod
    def from_dict(cls, data: Any) -> BlockKey:
        """Inverse of `to_dict`; TransformError on anything else."""
        if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
            raise TransformError(f"not a {KEY_FORMAT} object")
        if data.get("version") != KEY_FORMAT_VERSION:
            raise TransformError(f"unsupported {KEY_FORMAT} version {data.get('version')!r}")
        if data.get("channels", CHANNELS) != CHANNELS:
            raise TransformError(f"block keys have {CHANNELS} channels")
        for field in ("method", "block_size", "permutation"):
            if field not in data:
                raise TransformError(f"{KEY_FORMAT} object lacks {field!r}")
        return cls(data["method"], data["block_size"], data["permutation"], data.get("password"), tag=data.get("tag"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> BlockKey:
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            raise TransformError(f"not valid {KEY_FORMAT} JSON") from None
        return cls.from_dict(data)

    # -- public, non-secret attributes ----------------------------------------------------

    @property
    def method(self) -> str:
        return self._method

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def length(self) -> int:
        """M*M*3, the length of a block vector."""
        return self._perm.size

    @property
    def tag(self) -> str:
        """A random label chosen when the key was made; says nothing about the material."""
        return self._tag

    # -- key material ---------------------------------------------------------------------

    @property
    def permutation(self) -> np.ndarray:
        """int64[M*M*3], read-only: SHF reads position i of a block vector from permutation[i]."""
        return self._perm

    @property
    def password(self) -> str | None:
        """The FFX password; None for shf and np."""
        return self._password

    @property
    def selection(self) -> np.ndarray:
        """bool[M*M*3]: the block-vector positions NP and FFX transform (reference rule key > L/2)."""
        return self._cached(("selection",), lambda: self._perm > self._perm.size / 2)

    # -- index maths shared by the numpy SDK and the torch training path -------------------

    def gather_index(self, height: int, width: int, *, inverse: bool = False) -> np.ndarray:
        """int64[H*W*3], read-only: SHF of an HWC image is `image.reshape(-1)[index]` (shf keys only).

        With `inverse=True` the index undoes the shuffle.
        """
        self._require((Mode.SHF,), "gather_index")
        return self._cached(("gather", height, width, inverse), lambda: self._build_gather(height, width, inverse))

    def selection_mask(self, height: int, width: int) -> np.ndarray:
        """bool[H, W, 3], read-only: the pixels NP and FFX transform in an HWC image (np/ffx keys)."""
        self._require((Mode.NP, Mode.FFX), "selection_mask")
        return self._cached(("mask", height, width), lambda: self._build_mask(height, width))

    def ffx_table(self) -> np.ndarray:
        """uint16[256], read-only: FFX encryption of each pixel value (ffx keys only)."""
        self._require((Mode.FFX,), "ffx_table")
        password = self._password
        if password is None:  # made by from_dict/generate: an ffx key always has its password
            raise TransformError("this ffx key has no password")
        return self._cached(("ffx",), lambda: _ffx.ffx_table(password))

    def ffx_inverse_table(self) -> np.ndarray:
        """int16[1000], read-only: the pixel value behind each FFX value, -1 where none (ffx keys)."""
        self._require((Mode.FFX,), "ffx_inverse_table")
        return self._cached(("ffx-inverse",), lambda: _ffx.ffx_inverse_table(self.ffx_table()))

    def ffx_lookup(self) -> np.ndarray:
        """uint16[512]: FFX of a whole image is `lookup[value + 256 * selected]` (ffx keys only)."""
        self._require((Mode.FFX,), "ffx_lookup")
        return self._cached(("ffx-lookup",), lambda: _ffx.ffx_lookup(self.ffx_table()))

    def ffx_inverse_lookup(self) -> np.ndarray:
        """int16[2000]: inverse FFX is `lookup[value + 1000 * selected]`, -1 if invalid (ffx keys)."""
        self._require((Mode.FFX,), "ffx_inverse_lookup")
        return self._cached(("ffx-inverse-lookup",), lambda: _ffx.ffx_inverse_lookup(self.ffx_inverse_table()))

    def cached_layout(self, name: str, height: int, width: int, build: Callable[[], np.ndarray]) -> np.ndarray:
        """A derived per-shape array, built once and kept with the key (used by the transforms)."""
        return self._cached(("layout", name, height, width), build)

    # -- dunder ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"BlockKey(method={self._method!r}, block_size={self._block_size}, tag={self._tag!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockKey):
            return NotImplemented
        return hmac.compare_digest(self._material_digest, other._material_digest)

    def __hash__(self) -> int:
        return hash(self._material_digest)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling (e.g. into DataLoader workers) carries the material but never the caches.
        return (_from_state, (self._method, self._block_size, self._perm, self._password, self._tag))

    # -- private --------------------------------------------------------------------------

    def _require(self, methods: tuple[Mode, ...], what: str) -> None:
        if self._method not in methods:
            raise TransformError(f"{what} applies to {'/'.join(methods)} keys, not {self._method!r}")

    def _cached(self, name: tuple[Any, ...], build: Callable[[], np.ndarray]) -> np.ndarray:
        value = self._cache.get(name)
        if value is None:
            value = build()
            value.flags.writeable = False
            with self._lock:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[name] = value
        return value

    def _build_gather(self, height: int, width: int, inverse: bool) -> np.ndarray:
        vectors = block_vector_index(height, width, self._block_size)
        perm = np.argsort(self._perm) if inverse else self._perm
        gather = np.empty(height * width * CHANNELS, dtype=np.int64)
        # Output element i of every block comes from element perm[i] of the same block.
        gather[vectors] = vectors[..., perm]
        return gather

    def _build_mask(self, height: int, width: int) -> np.ndarray:
        vectors = block_vector_index(height, width, self._block_size)
        mask = np.empty(height * width * CHANNELS, dtype=bool)
        mask[vectors] = np.broadcast_to(self.selection, vectors.shape)
        return mask.reshape(height, width, CHANNELS)


def _from_state(method: str, block_size: int, perm: np.ndarray, password: str | None, tag: str) -> BlockKey:
    return BlockKey(method, block_size, perm, password, tag=tag)


def _check_method(method: object) -> None:
    if method not in METHODS:
        raise TransformError(f"unknown block method {method!r}; expected one of {[m.value for m in METHODS]}")


def _as_int_vector(value: Any) -> np.ndarray | None:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if array.dtype.kind not in "iu" or array.ndim != 1:
        return None
    return array.astype(np.int64, copy=True)


def _is_permutation(perm: np.ndarray) -> bool:
    if perm.min(initial=0) < 0 or perm.max(initial=0) >= perm.size:
        return False
    return bool(np.bincount(perm, minlength=perm.size).max(initial=1) == 1)
