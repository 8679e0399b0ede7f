"""Weights encrypted at rest: how a home stores `weights.safetensors` (DESIGN Additions "At rest").

Inside a home every revision's weights file holds, instead of safetensors, this format (version 1):

    offset 0   8 bytes   magic b"\\x89SLKWTS\\n"   (read as safetensors' u64 header length it is
                                                  ~7e17, so a safetensors reader refuses the file)
    offset 8   4 bytes   header length H, unsigned little-endian
    offset 12  H bytes   header, compact UTF-8 JSON:
                         {"format": "seglock-weights-at-rest", "version": 1, "cipher": "AES-256-GCM",
                          "key_id": "d<12 hex>", "chunk_bytes": 4194304, "chunks": N, "plain_bytes": P}
    then N chunk records, in order: 12-byte nonce (fresh from the OS CSPRNG) || ciphertext || 16-byte tag;
    every chunk but the last holds chunk_bytes plaintext bytes, the last the rest (P = 0: one empty chunk).

The cipher is AES-256-GCM under the model's data key (32 random bytes kept in the keystore, so
sealed by the master key through the keystore's envelope). Each chunk's associated data is

    b"seglock-weights-at-rest\\x00v1\\x00" + model name + b"\\x00r" + revision + b"\\x00" + header
    + chunk index (u32 big-endian) + chunk count (u32 big-endian)

so a file only opens as the revision of the model it was written for, with its own header, and a
chunk cut off, swapped or moved is refused. The plaintext is the artifact's ordinary safetensors
bytes: the manifest's sha256 and bytes describe them (checked after decryption), and `seglock
models export` writes them out again as a plain artifact.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

from seglock.models.errors import ArtifactError

__all__ = ["CHUNK_BYTES", "FORMAT", "MAGIC", "VERSION", "DataKey", "associated_data", "is_sealed", "seal", "unseal"]

MAGIC = b"\x89SLKWTS\n"
FORMAT = "seglock-weights-at-rest"
VERSION = 1
CIPHER = "AES-256-GCM"
CHUNK_BYTES = 4 << 20
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_LONGEST_HEADER = 4096
_AAD_PREFIX = f"{FORMAT}\x00v{VERSION}\x00".encode()


@dataclass(frozen=True)
class DataKey:
    """A model's at-rest data key: a public id (named in each file's header) and 32 secret bytes."""

    id: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ArtifactError(f"an at-rest data key must be {KEY_BYTES} bytes")


def associated_data(model: str, revision: int) -> bytes:
    """What a model revision's weights are bound to (the header and chunk index are added per chunk)."""
    return _AAD_PREFIX + model.encode("utf-8") + b"\x00r" + str(int(revision)).encode("ascii") + b"\x00"


def is_sealed(data: bytes) -> bool:
    """True when `data` (a weights file, or its first 8 bytes) is in the at-rest format."""
    return data[: len(MAGIC)] == MAGIC


def seal(plain: bytes, key: DataKey, aad: bytes, *, chunk_bytes: int = CHUNK_BYTES) -> bytes:
    """`plain` encrypted in the format above; `aad` from `associated_data`."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    chunks = max(1, -(-len(plain) // chunk_bytes))
    header = json.dumps({"format": FORMAT, "version": VERSION, "cipher": CIPHER, "key_id": key.id,
                         "chunk_bytes": chunk_bytes, "chunks": chunks, "plain_bytes": len(plain)},
                        separators=(",", ":")).encode("utf-8")
    aead = AESGCM(key.key)
    out = [MAGIC, struct.pack("<I", len(header)), header]
    view = memoryview(plain)
    for index in range(chunks):
        nonce = os.urandom(NONCE_BYTES)
        piece = view[index * chunk_bytes : (index + 1) * chunk_bytes]
        out += [nonce, aead.encrypt(nonce, bytes(piece), aad + header + struct.pack(">II", index, chunks))]
    return b"".join(out)


def read_header(data: bytes, where: str = "the weights file") -> tuple[dict, int]:
    """(header, offset of the first chunk) of a sealed file; ArtifactError if it is not one."""
    if not is_sealed(data) or len(data) < len(MAGIC) + 4:
        raise ArtifactError(f"{where} is not in the seglock at-rest format")
    (length,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if not 0 < length <= _LONGEST_HEADER or start + length > len(data):
        raise ArtifactError(f"{where}: at-rest header length {length} is invalid")
    try:
        header = json.loads(data[start : start + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{where}: at-rest header is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{where}: at-rest header is not a {FORMAT} header")
    if header.get("version") != VERSION or header.get("cipher") != CIPHER:
        raise ArtifactError(f"{where}: at-rest format version {header.get('version')!r} "
                            f"({header.get('cipher')!r}) is not supported (this seglock reads {VERSION}, {CIPHER})")
    for name in ("chunk_bytes", "chunks", "plain_bytes"):
        value = header.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "plain_bytes" else 1):
            raise ArtifactError(f"{where}: at-rest header field {name!r} is invalid")
    if header["chunks"] != max(1, -(-header["plain_bytes"] // header["chunk_bytes"])):
        raise ArtifactError(f"{where}: at-rest header chunk count does not fit its sizes")
    if not isinstance(header.get("key_id"), str):
        raise ArtifactError(f"{where}: at-rest header names no key id")
    return header, start + length


def unseal(data: bytes, key: DataKey, aad: bytes, where: str = "the weights file") -> bytes:
    """The plaintext of a sealed file; ArtifactError when any byte, the key or the binding is wrong."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header, offset = read_header(data, where)
    if header["key_id"] != key.id:
        raise ArtifactError(f"{where} was encrypted under data key {header['key_id']}, "
                            f"but the keystore holds {key.id} for this model")
    header_bytes = data[len(MAGIC) + 4 : offset]
    chunks, size, plain_bytes = header["chunks"], header["chunk_bytes"], header["plain_bytes"]
    aead = AESGCM(key.key)
    out = []
    for index in range(chunks):
        length = min(size, plain_bytes - index * size) if plain_bytes else 0
        end = offset + NONCE_BYTES + length + TAG_BYTES
        if end > len(data):
            raise ArtifactError(f"{where} is cut short (chunk {index + 1} of {chunks} incomplete)")
        nonce = data[offset : offset + NONCE_BYTES]
        try:
            out.append(aead.decrypt(nonce, data[offset + NONCE_BYTES : end],
                                    aad + header_bytes + struct.pack(">II", index, chunks)))
        except InvalidTag:
            raise ArtifactError(f"{where} does not decrypt (chunk {index + 1} of {chunks}): it was altered, "
                                "or belongs to another model or revision") from None
        offset = end
    if offset != len(data):
        raise ArtifactError(f"{where} has {len(data) - offset} bytes after its last chunk")
    return b"".join(out)
