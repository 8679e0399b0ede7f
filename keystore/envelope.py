"""The keystore file format: a versioned AES-256-GCM envelope in one JSON document.

    {"format":"seglock-keystore","version":1,"cipher":"AES-256-GCM","kdf":{...},
     "nonce":"<b64>","key_check":"<b64>","ciphertext":"<b64>","checksum":"<sha256 hex>"}\\n

- The header (format, version, cipher, kdf, nonce, key_check) is the AEAD's associated data,
  so no header field can be changed without failing authentication.
- `key_check` is an HKDF output of the master key: a wrong key is told apart from a damaged
  file without trying to decrypt (it reveals nothing of the key).
- `checksum` is SHA-256 of every byte before `,"checksum":"`; it is the outer frame that every
  format version keeps, so bit rot and truncation are told apart from a wrong key.
- A fresh 96-bit nonce from the OS CSPRNG for every write.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from seglock.keystore.errors import (
    KeystoreCorrupt,
    KeystoreTampered,
    KeystoreTruncated,
    MasterKeyError,
    UnsupportedFormatVersion,
    WrongMasterKey,
)
from seglock.keystore.master import ScryptParams

FORMAT = "seglock-keystore"
FORMAT_VERSION = 1
CIPHER = "AES-256-GCM"
NONCE_BYTES = 12
KEY_CHECK_BYTES = 32
_MAGIC = b'{"format":"seglock-keystore"'
_CHECKSUM_MARK = b',"checksum":"'
_TAIL = re.compile(rb',"checksum":"([0-9a-f]{64})"\}\n\Z')
_TAIL_LEN = len(_CHECKSUM_MARK) + 64 + len(b'"}\n')
_FIELDS = ("format", "version", "cipher", "kdf", "nonce", "key_check", "ciphertext", "checksum")
_RESTORE = "the file was left as it is; restore it from a backup"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def _hkdf(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


class EnvelopeKeys:
    """The AEAD key and key check derived from a master key; never shows either."""

    __slots__ = ("_aead", "check", "audit")

    def __init__(self, master: bytes) -> None:
        # Separate HKDF outputs: the key check published in the header says nothing of the AEAD key.
        self._aead = AESGCM(_hkdf(master, b"seglock keystore v1 aead key"))
        self.check = _hkdf(master, b"seglock keystore v1 key check")
        self.audit = _hkdf(master, b"seglock audit v1 hmac key")  # keys the audit log's HMAC chain

    def __repr__(self) -> str:
        return "EnvelopeKeys(<hidden>)"


@dataclass(frozen=True)
class Header:
    """The authenticated, unencrypted part of the file."""

    version: int
    kdf: dict[str, Any]
    nonce: bytes
    key_check: bytes

    def fields(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "cipher": CIPHER,
            "kdf": self.kdf,
            "nonce": _b64(self.nonce),
            "key_check": _b64(self.key_check),
        }

    def associated_data(self) -> bytes:
        return _dump(self.fields()).encode("ascii")


@dataclass(frozen=True)
class Envelope:
    header: Header
    ciphertext: bytes


def seal(plaintext: bytes, keys: EnvelopeKeys, kdf: dict[str, Any]) -> bytes:
    """The file bytes holding `plaintext` under `keys`, with a fresh nonce."""
    header = Header(FORMAT_VERSION, kdf, os.urandom(NONCE_BYTES), keys.check)
    ciphertext = keys._aead.encrypt(header.nonce, plaintext, header.associated_data())
    # Base64 needs no JSON escaping: append it rather than let json scan megabytes of it.
    head = _dump(header.fields())[:-1].encode("ascii")
    body = b"".join((head, b',"ciphertext":"', base64.b64encode(ciphertext), b'"'))
    digest = hashlib.sha256(body).hexdigest().encode("ascii")
    return body + _CHECKSUM_MARK + digest + b'"}\n'


def parse(data: bytes, path: str | Path) -> Envelope:
    """Check the frame, checksum and version of file bytes; no key needed."""
    if not data:
        raise KeystoreTruncated(f"{path} is empty (truncated); {_RESTORE}", path=path)
    tail = _TAIL.search(data, max(0, len(data) - _TAIL_LEN))
    if tail is None:
        _refuse_unframed(data, path)
    body = data[: tail.start()]
    if hashlib.sha256(body).hexdigest().encode("ascii") != tail.group(1):
        raise KeystoreCorrupt(
            f"{path} is damaged: its checksum does not match (a changed or flipped byte); {_RESTORE}",
            path=path,
        )
    try:
        doc = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise KeystoreCorrupt(f"{path} is damaged: it is not valid JSON; {_RESTORE}", path=path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeystoreCorrupt(f"{path} is not a seglock keystore; check --home", path=path)
    _check_version(doc, path)
    return _envelope_from(doc, path)


def unseal(envelope: Envelope, keys: EnvelopeKeys, path: str | Path, origin: str) -> bytes:
    """The plaintext, or WrongMasterKey / KeystoreTampered."""
    if not hmac.compare_digest(envelope.header.key_check, keys.check):
        raise WrongMasterKey(
            f"{path}: the master key from {origin} does not open this keystore; "
            "supply the master key it was made with",
            path=path,
        )
    header = envelope.header
    try:
        return keys._aead.decrypt(header.nonce, envelope.ciphertext, header.associated_data())
    except InvalidTag:
        raise KeystoreTampered(
            f"{path} fails authentication although the master key is right: it was altered "
            f"after it was written; {_RESTORE}",
            path=path,
        ) from None


def _check_version(doc: dict[str, Any], path: str | Path) -> None:
    version = doc.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UnsupportedFormatVersion(
            f"{path} is keystore format version {version!r}; this seglock reads version "
            f"{FORMAT_VERSION}: use a seglock that reads it (the file was left as it is)",
            path=path,
        )


def _refuse_unframed(data: bytes, path: str | Path) -> NoReturn:
    """Raise the fitting error for bytes without a checksum frame."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        error: ValueError | None = None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            doc, error = None, exc
        # A later format may frame itself differently; say "version", not "damaged".
        if isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("version") != FORMAT_VERSION:
            _check_version(doc, path)
        if _is_prefix_of_document(data, doc, error):
            raise KeystoreTruncated(
                f"{path} is truncated: it ends after {len(data)} bytes; {_RESTORE}", path=path
            )
    if not (data.startswith(_MAGIC) or _MAGIC.startswith(data)):
        raise KeystoreCorrupt(f"{path} is not a seglock keystore; check --home", path=path)
    raise KeystoreCorrupt(f"{path} is damaged: its checksum frame is broken; {_RESTORE}", path=path)


def _is_prefix_of_document(data: bytes, doc: Any, error: ValueError | None) -> bool:
    """Whether `data` is a keystore cut short: JSON that ran out of input, not JSON gone wrong."""
    if data.endswith(b"\n") or not (data.startswith(_MAGIC) or _MAGIC.startswith(data)):
        return False  # every write ends with its only newline; a cut removes it
    if error is None:
        return isinstance(doc, dict) and data.endswith(b"}")  # only the newline is missing
    if not isinstance(error, json.JSONDecodeError):
        return False
    return error.msg.startswith("Unterminated string") or (
        error.msg.startswith("Expecting") and error.pos >= len(data)
    )


def _decode(doc: dict[str, Any], field: str, size: int | None, path: str | Path) -> bytes:
    value: Any = doc.get(field)  # None or a non-string: AttributeError below
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (AttributeError, UnicodeEncodeError, binascii.Error, ValueError):
        raise KeystoreCorrupt(f"{path} is damaged: header field {field!r} is not base64", path=path) from None
    if size is not None and len(raw) != size:
        raise KeystoreCorrupt(f"{path} is damaged: header field {field!r} has the wrong length", path=path)
    return raw


def _envelope_from(doc: dict[str, Any], path: str | Path) -> Envelope:
    if tuple(doc) != _FIELDS:
        raise KeystoreCorrupt(f"{path} is damaged: unexpected header fields {sorted(doc)}", path=path)
    if doc["cipher"] != CIPHER:
        raise KeystoreCorrupt(f"{path} is damaged: unknown cipher {doc['cipher']!r}", path=path)
    kdf = _checked_kdf(doc["kdf"], path)
    ciphertext = _decode(doc, "ciphertext", None, path)
    if len(ciphertext) < 16:
        raise KeystoreCorrupt(f"{path} is damaged: the ciphertext is too short", path=path)
    header = Header(
        version=doc["version"],
        kdf=kdf,
        nonce=_decode(doc, "nonce", NONCE_BYTES, path),
        key_check=_decode(doc, "key_check", KEY_CHECK_BYTES, path),
    )
    return Envelope(header, ciphertext)


def _checked_kdf(kdf: Any, path: str | Path) -> dict[str, Any]:
    if isinstance(kdf, dict) and list(kdf) == ["name"] and kdf["name"] == "none":
        return kdf
    if isinstance(kdf, dict) and list(kdf) == ["name", "salt", "n", "r", "p"] and kdf["name"] == "scrypt":
        try:
            ScryptParams(n=kdf["n"], r=kdf["r"], p=kdf["p"])
        except MasterKeyError as exc:
            raise KeystoreCorrupt(f"{path} is damaged: {exc}", path=path) from None
        if not 8 <= len(_decode(kdf, "salt", None, path)) <= 64:
            raise KeystoreCorrupt(f"{path} is damaged: the scrypt salt has the wrong length", path=path)
        return kdf
    raise KeystoreCorrupt(f"{path} is damaged: unknown KDF header", path=path)
