"""Where the master key comes from, and how a passphrase becomes one (scrypt).

Sources, first match wins: `SEGLOCK_MASTER_KEY` (base64 of 32 bytes) or `SEGLOCK_MASTER_KEY_FILE`,
then `SEGLOCK_MASTER_PASSPHRASE` or `SEGLOCK_MASTER_PASSPHRASE_FILE` (the Docker/Kubernetes
`_FILE` convention), then a `master.key` file beside the keystore. When any of the variables
is set, no `master.key` is ever written.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from seglock.client import fsio
from seglock.keystore.errors import MasterKeyError, WrongMasterKey

log = logging.getLogger("seglock.keystore")

KEY_BYTES = 32
SALT_BYTES = 16
MASTER_KEY_FILENAME = "master.key"
ENV_PREFIX = "SEGLOCK_MASTER"  # SEGLOCK_MASTER_KEY, SEGLOCK_MASTER_KEY_FILE, ...
NEW_ENV_PREFIX = "SEGLOCK_NEW_MASTER"  # the key `change-master-key` moves to
ALL_SOURCES = "SEGLOCK_MASTER_KEY(_FILE) or SEGLOCK_MASTER_PASSPHRASE(_FILE)"
REQUIRE_ENV = "SEGLOCK_REQUIRE_MASTER_KEY"  # set in the Docker image: never a master.key in the home
DEV_ENV = "SEGLOCK_DEV"  # ...unless this says it is a development run


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")
# A stored header must not make us allocate without bound: 1 GiB of scrypt memory at most.
_SCRYPT_MAX_MEMORY = 1 << 30


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost parameters; the defaults are strong, tests pass small ones."""

    n: int = 2**15
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and self.n >= 2 and self.n & (self.n - 1) == 0):
            raise MasterKeyError(f"scrypt n must be a power of two >= 2, got {self.n!r}")
        if not (isinstance(self.r, int) and 1 <= self.r <= 32):
            raise MasterKeyError(f"scrypt r must be an integer in 1..32, got {self.r!r}")
        if not (isinstance(self.p, int) and 1 <= self.p <= 16):
            raise MasterKeyError(f"scrypt p must be an integer in 1..16, got {self.p!r}")
        if 128 * self.n * self.r > _SCRYPT_MAX_MEMORY:
            raise MasterKeyError(f"scrypt n={self.n}, r={self.r} needs more than 1 GiB of memory")


class MasterKey:
    """A raw master key or a passphrase, and where it came from; never shows the secret."""

    __slots__ = ("kind", "origin", "file", "_secret")

    def __init__(self, kind: str, secret: bytes, origin: str, file: Path | None = None) -> None:
        if kind not in ("raw", "passphrase"):
            raise MasterKeyError(f"master key kind must be 'raw' or 'passphrase', got {kind!r}")
        if kind == "raw" and len(secret) != KEY_BYTES:
            raise MasterKeyError(f"{origin}: a master key must be {KEY_BYTES} bytes, got {len(secret)}")
        if kind == "passphrase" and not secret:
            raise MasterKeyError(f"{origin}: the passphrase is empty")
        self.kind = kind
        self.origin = origin  # e.g. "SEGLOCK_MASTER_KEY" or "/srv/seglock/master.key": never the secret
        self.file = file  # the master.key file this came from, if any
        self._secret = secret

    @classmethod
    def generate(cls, origin: str = "a generated key", file: Path | None = None) -> MasterKey:
        """A fresh random raw master key from the OS CSPRNG."""
        return cls("raw", secrets.token_bytes(KEY_BYTES), origin, file)

    @classmethod
    def from_base64(cls, text: str, origin: str, file: Path | None = None) -> MasterKey:
        """Parse base64 (standard or URL-safe) of 32 bytes; the message never echoes the text."""
        return cls("raw", _decode_key(text, origin), origin, file)

    @classmethod
    def from_passphrase(cls, passphrase: str, origin: str) -> MasterKey:
        return cls("passphrase", passphrase.encode("utf-8"), origin)

    def to_base64(self) -> str:
        """The raw key as base64, for writing a master.key file."""
        if self.kind != "raw":
            raise MasterKeyError("a passphrase has no base64 form")
        return base64.b64encode(self._secret).decode("ascii")

    def new_kdf(self, scrypt: ScryptParams | None = None) -> dict[str, Any]:
        """The KDF header for a keystore written under this key (a fresh salt for a passphrase)."""
        if self.kind == "raw":
            return {"name": "none"}
        params = scrypt or ScryptParams()
        salt = base64.b64encode(secrets.token_bytes(SALT_BYTES)).decode("ascii")
        return {"name": "scrypt", "salt": salt, "n": params.n, "r": params.r, "p": params.p}

    def derive(self, kdf: Mapping[str, Any], path: str | Path) -> bytes:
        """The 32-byte key for a keystore whose header names `kdf`."""
        name = kdf.get("name")
        if name == "none":
            if self.kind != "raw":
                raise WrongMasterKey(
                    f"{path} is encrypted under a raw master key, but {self.origin} gives a "
                    "passphrase: set SEGLOCK_MASTER_KEY (or SEGLOCK_MASTER_KEY_FILE) instead",
                    path=path,
                )
            return self._secret
        if name == "scrypt":
            if self.kind != "passphrase":
                raise WrongMasterKey(
                    f"{path} is encrypted under a passphrase, but {self.origin} gives a raw key: "
                    "set SEGLOCK_MASTER_PASSPHRASE (or SEGLOCK_MASTER_PASSPHRASE_FILE) instead",
                    path=path,
                )
            params = ScryptParams(n=kdf["n"], r=kdf["r"], p=kdf["p"])
            salt = base64.b64decode(kdf["salt"], validate=True)
            return Scrypt(salt=salt, length=KEY_BYTES, n=params.n, r=params.r, p=params.p).derive(
                self._secret
            )
        raise MasterKeyError(f"{path}: unknown KDF {name!r}", path=path)

    def __repr__(self) -> str:
        return f"MasterKey(kind={self.kind!r}, origin={self.origin!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:  # never pickled into a worker's arguments or a crash dump
        raise TypeError("a MasterKey cannot be pickled")


def _decode_key(text: str, origin: str) -> bytes:
    # Accept the URL-safe alphabet too; validate=True refuses anything that is not base64.
    text = text.strip().replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise MasterKeyError(
            f"{origin}: a master key must be base64 of {KEY_BYTES} bytes and this is not base64; "
            "make one with `openssl rand -base64 32`"
        ) from None
    if len(raw) != KEY_BYTES:
        raise MasterKeyError(
            f"{origin}: a master key must be base64 of {KEY_BYTES} bytes, got {len(raw)} bytes; "
            "make one with `openssl rand -base64 32`"
        )
    return raw


def _read_secret_file(path_text: str, variable: str) -> str:
    path = Path(path_text)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise MasterKeyError(f"{variable}={path}: cannot read it ({reason})") from None


def master_key_from_env(env: Mapping[str, str], prefix: str = ENV_PREFIX) -> MasterKey | None:
    """The master key the environment names (`<prefix>_KEY`, `_KEY_FILE`, `_PASSPHRASE`, `_PASSPHRASE_FILE`)."""
    names = {suffix: f"{prefix}_{suffix}" for suffix in ("KEY", "KEY_FILE", "PASSPHRASE", "PASSPHRASE_FILE")}
    present = {suffix: env[name] for suffix, name in names.items() if name in env}
    for suffix, value in present.items():
        if not value:
            raise MasterKeyError(f"{names[suffix]} is set but empty: give it a value or unset it")
    for pair in (("KEY", "KEY_FILE"), ("PASSPHRASE", "PASSPHRASE_FILE")):
        if all(s in present for s in pair):
            raise MasterKeyError(f"both {names[pair[0]]} and {names[pair[1]]} are set: set only one")
    has_key = "KEY" in present or "KEY_FILE" in present
    has_passphrase = "PASSPHRASE" in present or "PASSPHRASE_FILE" in present
    if has_key and has_passphrase:
        log.warning("%s_KEY wins over %s_PASSPHRASE, which is ignored", prefix, prefix)
    if "KEY" in present:
        return MasterKey.from_base64(present["KEY"], names["KEY"])
    if "KEY_FILE" in present:
        text = _read_secret_file(present["KEY_FILE"], names["KEY_FILE"])
        return MasterKey.from_base64(text, f"{names['KEY_FILE']}={present['KEY_FILE']}")
    if "PASSPHRASE" in present:
        return MasterKey.from_passphrase(present["PASSPHRASE"], names["PASSPHRASE"])
    if "PASSPHRASE_FILE" in present:
        text = _read_secret_file(present["PASSPHRASE_FILE"], names["PASSPHRASE_FILE"])
        # Secret files usually end with one newline that is not part of the passphrase.
        text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
        return MasterKey.from_passphrase(text, f"{names['PASSPHRASE_FILE']}={present['PASSPHRASE_FILE']}")
    return None


def env_names_master_key(env: Mapping[str, str], prefix: str = ENV_PREFIX) -> bool:
    """Whether any master-key variable is set (then no master.key may be written)."""
    return any(f"{prefix}_{s}" in env for s in ("KEY", "KEY_FILE", "PASSPHRASE", "PASSPHRASE_FILE"))


def read_master_key_file(path: Path) -> MasterKey:
    """Read a `master.key` file (base64 of 32 bytes); warns when others may read it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not ASCII"
        raise MasterKeyError(f"{path}: cannot read the master key file ({reason})", path=path) from None
    if mode & 0o077:
        log.warning("%s is readable by others (mode %03o): chmod 600 it", path, mode)
    return MasterKey.from_base64(text, str(path), file=path)


def write_master_key_file(path: Path, key: MasterKey) -> bool:
    """Write `key` to a new 0600 `path` unless the file exists; True when written."""
    return fsio.atomic_create(path, (key.to_base64() + "\n").encode("ascii"))


def generate_master_key_file(path: Path) -> MasterKey:
    """A developer's first start: make `master.key` (0600) and warn that production should not."""
    key = MasterKey.generate(str(path), file=path)
    if not write_master_key_file(path, key):
        return read_master_key_file(path)  # another process made it first
    log.warning(
        "generated a development master key at %s; in production pass the master key in from "
        "outside (%s) and keep it off the keystore's disk",
        path,
        ALL_SOURCES,
    )
    return key


def resolve_master_key(
    home: Path, env: Mapping[str, str], *, generate: bool = False
) -> MasterKey:
    """The master key for the keystore in `home`: environment first, then `home/master.key`.

    With `generate`, a missing `master.key` is made, unless the environment names a source.
    """
    from_env = master_key_from_env(env)
    if from_env is not None:
        return from_env
    path = home / MASTER_KEY_FILENAME
    if _truthy(env.get(REQUIRE_ENV)) and not _truthy(env.get(DEV_ENV)):
        # A key beside the keystore makes encryption at rest pointless: the image refuses it.
        raise MasterKeyError(
            f"no master key given: set {ALL_SOURCES} ({REQUIRE_ENV} is set, so no {MASTER_KEY_FILENAME} in the "
            f"home is made or used; set {DEV_ENV}=1 for a development run)", path=path)
    if path.exists():
        return read_master_key_file(path)
    if generate:
        return generate_master_key_file(path)
    raise MasterKeyError(
        f"no master key for the keystore in {home}: set {ALL_SOURCES}, or put its master.key in {home}",
        path=path,
    )


def file_mode(path: Path) -> int:
    """The permission bits of `path` (for status and tests)."""
    return stat.S_IMODE(os.stat(path).st_mode)
