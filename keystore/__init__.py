"""seglock's encrypted keystore: model keys with versions, hashed API tokens with grants, audit log.

Backends (`seglock.keystore.storage`): the file `HOME/keystore.json` (default), or a PostgreSQL
row shared by many hosts when `SEGLOCK_KEYSTORE_URL(_FILE)` (or `url=`) names a database
(`seglock.keystore.postgres`, extra `seglock[postgres]`). Both hold the same sealed envelope.

One file, `HOME/keystore.json` (0600): an AES-256-GCM envelope (see `seglock.keystore.envelope`) under a
master key from `SEGLOCK_MASTER_KEY(_FILE)`, `SEGLOCK_MASTER_PASSPHRASE(_FILE)` (scrypt), or a
developer's `HOME/master.key` (see `seglock.keystore.master`). Imports cryptography, filelock, stdlib only.

Opening::

    ks = Keystore.open(home, create=True)          # env/clock/master/scrypt injectable for tests
    ks = Keystore.open(home)                       # KeystoreNotFound if there is none
    ks = Keystore.init(home)                       # KeystoreExists if there is one

Tokens (`slk_<id>_<secret>`; only SHA-256 of the secret is stored)::

    record, token = ks.create_token(name, ["segment"], ["deeplab"], expires_at=None, actor=None)
    grant = ks.verify_token(token, model="deeplab", scope="segment")   # Grant | None
    check = ks.check_token(token, model="deeplab", scope="segment")    # TokenCheck
    check.ok, check.reason, check.status, check.grant                  # status: 200, 401 or 403
    ks.list_tokens() -> list[TokenRecord];  ks.get_token(id);  ks.revoke_token(id, actor=None)

  `check_token` reasons: 401 for "malformed", "unknown", "bad_secret", "revoked", "expired";
  403 for "scope" and "model" (then `check.grant` says who asked). Both read the in-memory state
  after `refresh()`, one stat that reloads only when another process changed the file, so a
  revoked token fails on the next request. Grant: token_id, name, scopes, models ({"*"} = all),
  expires_at; `grant.allows_model(name)`, `grant.has_scope(scope)`.

Model keys (kind "cp" or "block"; per-image models store nothing)::

    v = ks.add_model_key(model, "cp", CPKey.to_dict(), activate=True, actor=None) -> KeyVersion
    ks.active_model_key(model) -> KeyVersion | None      # with .material
    ks.active_key_version(model) -> int | None           # its number only, no copy
    ks.get_model_key(model, version) -> KeyVersion       # with .material (None once destroyed)
    ks.model_key_versions(model) -> list[KeyVersion]     # without material;  ks.models()
    ks.set_active(model, version, actor=None)            # the previous active becomes "retiring"
    ks.destroy_model_key(model, version, actor=None)     # material removed; the active one is refused

  States: pending -> active -> retiring -> destroyed. Key rotation, one write per step:
  `add_model_key(..., activate=False)`, write the new artifact, `set_active(new)`,
  `destroy_model_key(old)`. Version numbers and ids (`KeyVersion.id`, for manifests) are never reused.

Writes: every change runs in `ks.transaction()` (file lock + reload if changed + mutate + one
atomic write); methods called inside an open transaction join it, and an exception discards it::

    with ks.transaction():
        ks.set_active(model, 2, actor=token_id)
        ks.destroy_model_key(model, 1, actor=token_id)

Audit: entries live outside the envelope, in append-only HMAC-chained segment files beside it
(`keystore.audit-NNNNNN.jsonl`, see `seglock.keystore.audit.AuditLog`); a change's entries are
written before it commits (a change that cannot be audited is not made). `ks.audit(action, target,
outcome, actor=..., detail=...)` adds one in O(1) without touching keystore.json (outcome "ok" |
"denied" | "error"); `ks.audit_log(limit=None)`; `ks.verify_audit()` checks the chain. A
keystore.json older than the audit log has seen is refused (`KeystoreRolledBack`) unless
`SEGLOCK_KEYSTORE_ALLOW_ROLLBACK=1`.

Master key: `ks.change_master_key(MasterKey | None, scrypt=None)` re-encrypts atomically.
`ks.status()` is a JSON-ready summary. Errors: `KeystoreError` and the subclasses in
`seglock.keystore.errors`; `.user_error` marks the caller's to fix. A failed open never writes the file.
Records' reprs never show material, secrets or hashes. Operators should back up keystore.json
and its master key separately; a backup keeps material destroyed after it was taken.
"""

from seglock.keystore.audit import AuditEntry
from seglock.keystore.errors import (
    InvalidRecord,
    KeyStateError,
    KeystoreCorrupt,
    KeystoreError,
    KeystoreExists,
    KeystoreLocked,
    KeystoreNotFound,
    KeystoreRolledBack,
    KeystoreTampered,
    KeystoreTruncated,
    KeystoreUnavailable,
    MasterKeyError,
    ModelKeyNotFound,
    TokenNotFound,
    UnsupportedFormatVersion,
    WrongMasterKey,
)
from seglock.keystore.master import MasterKey, ScryptParams, master_key_from_env
from seglock.keystore.model_keys import KeyVersion
from seglock.keystore.storage import KEYSTORE_FILENAME, keystore_url
from seglock.keystore.store import Keystore
from seglock.keystore.tokens import SCOPES, Grant, TokenCheck, TokenRecord

__all__ = [
    "AuditEntry",
    "Grant",
    "InvalidRecord",
    "KEYSTORE_FILENAME",
    "KeyStateError",
    "KeyVersion",
    "Keystore",
    "KeystoreCorrupt",
    "KeystoreError",
    "KeystoreExists",
    "KeystoreLocked",
    "KeystoreNotFound",
    "KeystoreRolledBack",
    "KeystoreTampered",
    "KeystoreTruncated",
    "KeystoreUnavailable",
    "MasterKey",
    "MasterKeyError",
    "ModelKeyNotFound",
    "SCOPES",
    "ScryptParams",
    "TokenCheck",
    "TokenNotFound",
    "TokenRecord",
    "UnsupportedFormatVersion",
    "WrongMasterKey",
    "keystore_url",
    "master_key_from_env",
]
