"""API tokens: `slk_<id>_<secret>`, stored as SHA-256 of the secret, with scopes and model grants.

The id (12 hex chars) finds the record; the secret (32 bytes from the OS CSPRNG, 64 hex chars)
is compared in constant time against its stored hash. A plain SHA-256 suffices: the secret is
256 random bits, so there is nothing for a slow password hash to protect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from seglock.keystore.errors import InvalidRecord

SCOPES = ("segment", "admin")
ALL_MODELS = "*"
TOKEN_PREFIX = "slk"
ID_CHARS = 12
SECRET_BYTES = 32
MAX_NAME = 200
_TOKEN = re.compile(r"slk_([0-9a-f]{12})_([0-9a-f]{64})")
_ID = re.compile(r"[0-9a-f]{12}")
# Compared against when the id is unknown, so an unknown id costs what a known one does.
_DUMMY_HASH = hashlib.sha256(b"seglock: no such token").digest()

# Why a token was refused; none of these is a secret. 401: the caller is not authenticated.
UNAUTHENTICATED = ("malformed", "unknown", "bad_secret", "revoked", "expired")
# 403: a valid token that lacks the scope or the model grant.
FORBIDDEN = ("scope", "model")


def hash_secret(secret: str) -> bytes:
    """SHA-256 of a token's secret part, as stored."""
    return hashlib.sha256(secret.encode("ascii")).digest()


def new_token_parts(taken: Collection[str]) -> tuple[str, str]:
    """A fresh (id, secret) from the OS CSPRNG; the id avoids those in `taken`."""
    while True:
        token_id = secrets.token_hex(ID_CHARS // 2)
        if token_id not in taken:
            return token_id, secrets.token_hex(SECRET_BYTES)


def format_token(token_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}_{token_id}_{secret}"


def parse_token(token: Any) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token string, else None."""
    if not isinstance(token, str):
        return None
    match = _TOKEN.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def is_token_id(text: Any) -> bool:
    return isinstance(text, str) and _ID.fullmatch(text) is not None


def describe_token_id(text: Any) -> str:
    """The id quoted for a message, or a placeholder: what a user passes as an id may be a whole token."""
    return repr(text) if is_token_id(text) else "<not a token id>"


@dataclass(frozen=True)
class Grant:
    """What a verified token may do: its scopes and the models it is granted. No secret."""

    token_id: str
    name: str
    scopes: frozenset[str]
    models: frozenset[str]  # model names, or {"*"} for every model
    expires_at: float | None

    @property
    def all_models(self) -> bool:
        return ALL_MODELS in self.models

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def allows_model(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models


@dataclass(frozen=True)
class TokenRecord:
    """A stored token; `secret_hash` is never shown in repr and never leaves the keystore file."""

    id: str
    name: str
    scopes: tuple[str, ...]
    models: tuple[str, ...]
    created_at: float
    expires_at: float | None = None
    revoked: bool = False
    revoked_at: float | None = None
    created_by: str | None = None
    secret_hash: bytes = field(default=b"", repr=False, compare=False)

    def status(self, now: float) -> str:
        """"active", "revoked" or "expired" at time `now`."""
        if self.revoked:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    @cached_property
    def grant(self) -> Grant:
        return Grant(self.id, self.name, frozenset(self.scopes), frozenset(self.models), self.expires_at)

    def public_dict(self) -> dict[str, Any]:
        """The record without its hash: what `tokens list` and the admin API show."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "models": list(self.models),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at,
            "created_by": self.created_by,
        }

    def to_json(self) -> dict[str, Any]:
        data = self.public_dict()
        del data["id"]
        data["hash"] = self.secret_hash.hex()
        return data

    @cached_property
    def json_text(self) -> str:
        """`to_json()` as compact JSON, made once: a write re-serialises only changed records."""
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, token_id: str, data: dict[str, Any]) -> TokenRecord:
        return cls(
            id=token_id,
            name=data["name"],
            scopes=tuple(data["scopes"]),
            models=tuple(data["models"]),
            created_at=data["created_at"],
            expires_at=data["expires_at"],
            revoked=data["revoked"],
            revoked_at=data["revoked_at"],
            created_by=data["created_by"],
            secret_hash=bytes.fromhex(data["hash"]),
        )


@dataclass(frozen=True)
class TokenCheck:
    """The outcome of checking a token: `ok`, a non-secret `reason`, and the grant if it is valid.

    `status` is the HTTP status a server should answer: 200, 401 (bad, unknown, revoked or
    expired token) or 403 (valid token without the scope or model grant; `grant` is set).
    """

    ok: bool
    reason: str
    grant: Grant | None = None

    @property
    def status(self) -> int:
        if self.ok:
            return 200
        return 403 if self.reason in FORBIDDEN else 401


def check_token(
    record: TokenRecord | None, secret: str, now: float, scope: str, model: str | None
) -> TokenCheck:
    """Check a parsed token against its record (None if the id is unknown)."""
    stored = record.secret_hash if record is not None else _DUMMY_HASH
    secret_ok = hmac.compare_digest(hash_secret(secret), stored)
    if record is None:
        return TokenCheck(False, "unknown")
    if not secret_ok:
        return TokenCheck(False, "bad_secret")
    if record.revoked:
        return TokenCheck(False, "revoked")
    if record.expires_at is not None and now >= record.expires_at:
        return TokenCheck(False, "expired")
    grant = record.grant
    if scope not in grant.scopes:
        return TokenCheck(False, "scope", grant)
    if model is not None and not grant.allows_model(model):
        return TokenCheck(False, "model", grant)
    return TokenCheck(True, "ok", grant)


def checked_name(name: Any, what: str = "token name") -> str:
    """A non-empty printable name of at most 200 characters."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRecord(f"a {what} must be a non-empty string")
    if len(name) > MAX_NAME or not name.isprintable():
        raise InvalidRecord(f"a {what} must be printable and at most {MAX_NAME} characters")
    return name


def checked_scopes(scopes: Iterable[str] | str) -> tuple[str, ...]:
    scopes = (scopes,) if isinstance(scopes, str) else tuple(scopes)
    unknown = sorted({s for s in scopes if s not in SCOPES}, key=str)
    if unknown:
        raise InvalidRecord(f"unknown scope {unknown[0]!r}: scopes are {', '.join(SCOPES)}")
    if not scopes:
        raise InvalidRecord(f"a token needs at least one scope ({', '.join(SCOPES)})")
    return tuple(s for s in SCOPES if s in scopes)


def checked_models(models: Iterable[str] | str, scopes: tuple[str, ...]) -> tuple[str, ...]:
    models = (models,) if isinstance(models, str) else tuple(models)
    for model in models:
        checked_name(model, "model name")
    if ALL_MODELS in models and len(set(models)) > 1:
        raise InvalidRecord(f"{ALL_MODELS!r} grants every model and cannot be listed with names")
    if "segment" in scopes and not models:
        raise InvalidRecord(f"a segment token needs at least one model (or {ALL_MODELS!r} for all)")
    return tuple(sorted(set(models)))
