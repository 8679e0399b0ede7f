"""The keystore: one encrypted envelope, read into memory, changed only through `transaction()`.

Writes: the writers' lock -> reload if another process changed the keystore -> mutate a copy ->
seal -> one atomic write. Where the sealed bytes live is the backend's business (`storage.py`):
the file backend locks with flock and writes temp file, fsync, rename, fsync the directory; the
PostgreSQL backend (`postgres.py`) locks the row (SELECT ... FOR UPDATE) and commits. A crash at
any point leaves the old envelope or the new one, and two processes never lose each other's
changes. Reads are served from memory after `refresh()` (one stat, or a look at what
LISTEN/NOTIFY said), so a change made elsewhere is seen on the next call.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

from seglock.client import fsio
from seglock.keystore import envelope
from seglock.keystore.audit import AuditEntry, AuditLog, AuditReport, make_entry
from seglock.keystore.errors import (
    InvalidRecord,
    KeyStateError,
    KeystoreCorrupt,
    KeystoreError,
    KeystoreExists,
    KeystoreNotFound,
    KeystoreRolledBack,
    KeystoreUnavailable,
    MasterKeyError,
    ModelKeyNotFound,
    TokenNotFound,
    WrongMasterKey,
)
from seglock.keystore.master import (
    ALL_SOURCES,
    MASTER_KEY_FILENAME,
    MasterKey,
    ScryptParams,
    master_key_from_env,
    read_master_key_file,
    resolve_master_key,
)
from seglock.keystore.model_keys import KeyVersion, checked_material, new_key_id
from seglock.keystore.storage import FileStorage, Snapshot, Storage, WriteSession, open_storage
from seglock.keystore.tokens import (
    SCOPES,
    Grant,
    TokenCheck,
    TokenRecord,
    check_token,
    checked_models,
    checked_name,
    checked_scopes,
    describe_token_id,
    format_token,
    hash_secret,
    new_token_parts,
    parse_token,
)

log = logging.getLogger("seglock.keystore")

PENDING_MASTER_KEY_FILENAME = "master.key.new"  # a generated master key not yet in force
STATE_SCHEMA = 1
DATA_KEY_BYTES = 32  # AES-256 (seglock.models.at_rest)
DEFAULT_LOCK_TIMEOUT = 30.0
ALLOW_ROLLBACK_ENV = "SEGLOCK_KEYSTORE_ALLOW_ROLLBACK"  # set once to accept a restored older keystore.json
# A database keystore keeps its audit entries inside the sealed state, in the row's same transaction
# (its hosts share no folder for segment files); the newest this many are kept, so it stays bounded.
DB_AUDIT_KEEP = 10_000

Clock = Callable[[], float]
_compact = functools.partial(json.dumps, separators=(",", ":"), allow_nan=False)


class _Options(TypedDict):
    """The keyword arguments `open` and `init` pass on to `Keystore(...)`."""

    clock: Clock | None
    scrypt: ScryptParams | None
    lock_timeout: float


def _resolve_master(storage: Storage, env: Mapping[str, str], *, generate: bool = False) -> MasterKey:
    """The file backend also takes (or, on a first start, makes) HOME/master.key; a database
    shared by many hosts takes its master key only from outside."""
    if isinstance(storage, FileStorage):  # the one backend of kind "file"
        return resolve_master_key(storage.home, env, generate=generate)
    master = master_key_from_env(env)
    if master is None:
        raise MasterKeyError(f"no master key for the keystore at {storage.location}: set {ALL_SOURCES}")
    return master


def _init_flags(storage: Storage) -> str:
    return f"--home {storage.home}" if isinstance(storage, FileStorage) else "--keystore URL"


@dataclass
class _State:
    created_at: float
    generation: int
    tokens: dict[str, TokenRecord]
    models: dict[str, tuple[KeyVersion, ...]]
    audit: list[AuditEntry]
    # per model, its at-rest data key {"id", "key" (base64), "created_at", "created_by"}; a
    # keystore written before data keys existed has none (the field is then left out)
    data_keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    def copy(self) -> _State:
        # Records are immutable, so copying the containers is a full copy.
        return _State(self.created_at, self.generation, dict(self.tokens), dict(self.models), list(self.audit),
                      dict(self.data_keys))

    def to_bytes(self) -> bytes:
        # Joined from each record's cached JSON: a write costs a join, not a full re-encode.
        tokens = ",".join(f'"{token_id}":{record.json_text}' for token_id, record in self.tokens.items())
        models = ",".join(
            f"{_compact(m)}:[{','.join(v.json_text for v in versions)}]" for m, versions in self.models.items()
        )
        audit = ",".join(entry.json_text for entry in self.audit)
        head = f'{{"schema":{STATE_SCHEMA},"created_at":{_compact(self.created_at)},"generation":{self.generation}'
        data_keys = f',"data_keys":{_compact(self.data_keys)}' if self.data_keys else ""
        return (f'{head},"tokens":{{{tokens}}},"models":{{{models}}},"audit":[{audit}]{data_keys}}}'
                .encode())

    @classmethod
    def from_bytes(cls, data: bytes, path: str | Path) -> _State:
        try:
            doc = json.loads(data)
            if doc["schema"] != STATE_SCHEMA:
                raise ValueError("schema")
            return cls(
                created_at=doc["created_at"],
                generation=doc["generation"],
                tokens={tid: TokenRecord.from_json(tid, rec) for tid, rec in doc["tokens"].items()},
                models={
                    m: tuple(KeyVersion.from_json(m, v) for v in versions) for m, versions in doc["models"].items()
                },
                audit=[AuditEntry.from_json(e) for e in doc["audit"]],
                data_keys={m: _checked_data_key(m, rec) for m, rec in doc.get("data_keys", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise KeystoreCorrupt(
                f"{path} decrypts but its contents are not a seglock keystore of schema {STATE_SCHEMA}; "
                "the file was left as it is",
                path=path,
            ) from None


def _checked_data_key(model: str, record: Any) -> dict[str, Any]:
    if not (isinstance(record, dict) and isinstance(record.get("id"), str)
            and len(base64.b64decode(record["key"], validate=True)) == DATA_KEY_BYTES):
        raise ValueError(f"data key of {model}")
    return record


def _material_copy(version: KeyVersion) -> KeyVersion:
    """`version` with a private copy of its material, so callers cannot change the store's."""
    return replace(version, material=copy.deepcopy(version.material))


def _without_material(version: KeyVersion) -> KeyVersion:
    return replace(version, material=None)


def _timestamp(value: float | datetime | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidRecord(f"{what} must be a timezone-aware datetime")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRecord(f"{what} must be epoch seconds or a datetime")
    return float(value)


class Keystore:
    """An open keystore. Make one with `Keystore.open` (or `Keystore.init`); see `keystore`."""

    def __init__(
        self,
        storage: Storage | str | os.PathLike[str],
        master: MasterKey,
        *,
        clock: Clock | None = None,
        scrypt: ScryptParams | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if isinstance(storage, (str, os.PathLike)):  # a home folder: the file backend
            storage = FileStorage(Path(storage), lock_timeout=lock_timeout)
        self._storage: Storage = storage
        self.location = storage.location  # for messages: a path, or a URL without its password
        self.home: Path | None = getattr(storage, "home", None)  # the file backend's folder
        self.path: Path | None = getattr(storage, "path", None)  # the file backend's keystore.json
        self._master = master
        self._clock: Clock = clock or time.time
        self._scrypt = scrypt
        self._lock_timeout = lock_timeout
        self._mutex = threading.RLock()  # threads of one process: one transaction at a time
        self._keys: dict[str, envelope.EnvelopeKeys] = {}  # derived keys by KDF header
        self._kdf: dict[str, Any] = {}
        self._state: _State | None = None
        self._snapshot: Snapshot | None = None  # the sealed bytes `_state` came from, and their version
        self._txn: _State | None = None
        self._txn_thread: int | None = None
        self._txn_dirty = False
        self._next_master: tuple[MasterKey, dict[str, Any]] | None = None
        self._txn_audit: list[AuditEntry] = []  # the open transaction's entries, written before its commit
        self._audit: tuple[str, AuditLog] | None = None

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        home: str | os.PathLike[str] | None,
        *,
        create: bool = False,
        clock: Clock | None = None,
        env: Mapping[str, str] | None = None,
        master: MasterKey | None = None,
        scrypt: ScryptParams | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        url: str | None = None,
    ) -> Keystore:
        """Open the keystore; with `create`, make it (and, for a file, a dev master.key) when missing.

        `url` (else `SEGLOCK_KEYSTORE_URL(_FILE)` in `env`) names a PostgreSQL keystore; without
        one, the keystore is `home/keystore.json`.
        """
        env = os.environ if env is None else env
        options = _Options(clock=clock, scrypt=scrypt, lock_timeout=lock_timeout)
        storage = open_storage(home, env, url=url, lock_timeout=lock_timeout)
        try:
            if not storage.exists():
                if not create:
                    raise KeystoreNotFound(
                        f"no keystore at {storage.location}: run `seglock keystore init {_init_flags(storage)}`",
                        path=storage.location,
                    )
                made = cls._create(storage, env, master, options, exist_ok=True)
                if made is not None:
                    return made
            master = master or _resolve_master(storage, env)
            store = cls(storage, master, **options)
            try:
                store._reload()
            except WrongMasterKey:
                finished = store._finish_master_key_change()
                if finished is None:
                    raise
                store = finished
            store._check_not_rolled_back(env.get(ALLOW_ROLLBACK_ENV, "").strip().lower() in ("1", "true", "yes"))
            return store
        except BaseException:
            storage.close()
            raise

    def _check_not_rolled_back(self, allow: bool) -> None:
        """Refuse a keystore.json older than the audit log says it was (an authentic file replayed).
        File backend only: a database keystore has no audit log beside it to compare with."""
        if self.home is None:
            return
        logged, pre_commit = self._audit_log().last_generation()
        generation = self._loaded.generation
        # An entry written just before a commit that a crash cut off names one generation more.
        if logged is None or logged <= generation or (logged == generation + 1 and pre_commit):
            return
        if not allow:
            raise KeystoreRolledBack(
                f"{self.location} is at generation {generation} but its audit log has seen generation {logged}: "
                f"an older copy was put in place. If this is a restore you made, start once with "
                f"{ALLOW_ROLLBACK_ENV}=1", path=self.location)
        log.warning("accepted %s rolled back from generation %d to %d", self.location, logged, generation)
        self._audit_log().append(make_entry(self._clock(), "system", "keystore.rollback", self.location, "ok",
                                            f"from generation {logged} to {generation}"), generation=generation)

    @classmethod
    def init(
        cls,
        home: str | os.PathLike[str] | None,
        *,
        clock: Clock | None = None,
        env: Mapping[str, str] | None = None,
        master: MasterKey | None = None,
        scrypt: ScryptParams | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        url: str | None = None,
    ) -> Keystore:
        """Make a new keystore (in `home`, or the database `url` names); KeystoreExists if there is one."""
        env = os.environ if env is None else env
        options = _Options(clock=clock, scrypt=scrypt, lock_timeout=lock_timeout)
        storage = open_storage(home, env, url=url, lock_timeout=lock_timeout)
        try:
            made = cls._create(storage, env, master, options, exist_ok=False)
        except BaseException:
            storage.close()
            raise
        assert made is not None
        return made

    @classmethod
    def _create(
        cls, storage: Storage, env: Mapping[str, str], master: MasterKey | None, options: _Options, *, exist_ok: bool
    ) -> Keystore | None:
        """Make the keystore under the writers' lock; None when another process made it first (and exist_ok)."""
        storage.prepare()
        with storage.writing() as session:
            if session.exists:
                if exist_ok:
                    return None
                where = (f"see `seglock keystore status --home {storage.home}`" if isinstance(storage, FileStorage)
                         else "see `seglock keystore status`")
                raise KeystoreExists(
                    f"a keystore already exists at {storage.location}; it was left as it is ({where})",
                    path=storage.location,
                )
            master = master or _resolve_master(storage, env, generate=True)
            store = cls(storage, master, **options)
            now = store._clock()
            store._kdf = master.new_kdf(store._scrypt)
            state = _State(created_at=now, generation=0, tokens={}, models={}, audit=[])
            create = make_entry(now, "system", "keystore.create", storage.location, "ok", None)
            if store.home is not None:
                store._audit_log().append(create, generation=1, pre_commit=True)
            else:
                state.audit.append(create)
            store._commit(state, session, [create])
            log.info("made a keystore at %s (master key from %s)", storage.location, master.origin)
            return store

    def _finish_master_key_change(self) -> Keystore | None:
        """Complete a generated master-key change that a crash cut off after the keystore write."""
        if self._master.file is None or self.home is None:
            return None
        pending = self.home / PENDING_MASTER_KEY_FILENAME
        if not pending.exists():
            return None
        successor = Keystore(
            self._storage, read_master_key_file(pending), clock=self._clock, scrypt=self._scrypt,
            lock_timeout=self._lock_timeout,
        )
        try:
            successor._reload()
        except KeystoreError:
            return None
        with self._storage.writing():
            os.replace(pending, self._master.file)
            fsio.fsync_dir(self.home)
        successor._master = read_master_key_file(self._master.file)
        log.warning("finished an interrupted master key change: %s now holds the new key", self._master.file)
        return successor

    # -- reading --------------------------------------------------------------------------

    def _envelope_keys(self, kdf: dict[str, Any]) -> envelope.EnvelopeKeys:
        cache_key = json.dumps(kdf, sort_keys=True)
        keys = self._keys.get(cache_key)
        if keys is None:  # scrypt is slow on purpose: derive once per KDF header
            keys = envelope.EnvelopeKeys(self._master.derive(kdf, self.location))
            self._keys[cache_key] = keys
        return keys

    def _reload(self, snapshot: Snapshot | None = None) -> None:
        """Check and decrypt the stored bytes; on any error the old state stays and nothing is written."""
        snapshot = snapshot or self._storage.load()
        try:
            sealed = envelope.parse(snapshot.data, self.location)
            keys = self._envelope_keys(sealed.header.kdf)
            plaintext = envelope.unseal(sealed, keys, self.location, self._master.origin)
            state = _State.from_bytes(plaintext, self.location)
            # Files only: a database restore (older row put back by an operator) is followed, not refused.
            if self.home is not None and self._state is not None and state.generation < self._state.generation:
                raise KeystoreRolledBack(
                    f"{self.location} went back from generation {self._state.generation} to {state.generation}: "
                    "an older copy was put in place while it was open; restart to accept a restore",
                    path=self.location)
        except BaseException:
            self._storage.release(snapshot)
            raise
        self._install(state, snapshot, sealed.header.kdf)
        log.debug("loaded %s (generation %d)", self.location, state.generation)

    def _install(self, state: _State, snapshot: Snapshot, kdf: dict[str, Any]) -> None:
        old = self._snapshot
        self._state, self._snapshot, self._kdf = state, snapshot, kdf
        self._storage.adopt(snapshot)
        if old is not None and old is not snapshot:
            self._storage.release(old)

    def changed(self) -> bool:
        """Whether `refresh()` would reload: one stat, or a look at what LISTEN/NOTIFY said, and no
        reading or decrypting (a server checks a token on its event loop when this is False).

        Raises as `refresh()` does when a database has been out of reach for too long."""
        return self._snapshot is None or self._storage.current_version() != self._snapshot.version

    def refresh(self) -> bool:
        """Reload if another process changed the keystore (one stat, or a look at what LISTEN/NOTIFY
        said, when it did not); True if reloaded.

        Raises the keystore's errors if the stored keystore no longer opens, or if a database has been
        out of reach for longer than reads may go on from memory (a server should answer 503).
        """
        version = self._storage.current_version()
        if self._snapshot is not None and version == self._snapshot.version:
            return False
        with self._mutex:
            if self._txn is not None:  # this thread's transaction reloaded under the lock already
                return False
            try:
                self._reload()
            except KeystoreUnavailable:
                if self._state is not None and self._storage.fresh_enough():
                    return False  # serve the last good state a little longer
                raise
        return True

    # -- writing --------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Keystore]:
        """Lock, reload if changed, run the block's changes, write them atomically in one write.

        The lock is the file lock, or the database row lock (SELECT ... FOR UPDATE); every
        mutating method runs in one; called inside an open transaction, it joins it, so
        `with ks.transaction(): ks.set_active(...); ks.destroy_model_key(...)` is a single write.
        An exception in the block discards its changes and writes nothing.
        """
        with self._mutex:
            if self._txn is not None:
                yield self
                return
            with self._storage.writing() as session:
                if self._snapshot is None or session.version != self._snapshot.version:
                    self._reload(session.load())
                self._txn, self._txn_thread, self._txn_dirty = self._loaded.copy(), threading.get_ident(), False
                self._txn_audit = []
                try:
                    yield self
                    if self._txn_dirty:
                        self._commit_audited(self._txn, session)
                finally:
                    self._txn, self._txn_thread, self._next_master = None, None, None
                    self._txn_audit = []

    def _commit_audited(self, state: _State, session: WriteSession) -> None:
        """Write the transaction's audit entries, then the change: nothing is changed unaudited."""
        entries = list(self._txn_audit)
        if self.home is None:  # a database: the entries go into the sealed state, in the same commit
            state.audit.extend(entries)
            del state.audit[:-DB_AUDIT_KEEP]
            self._commit(state, session, entries)
            return
        audit = self._audit_log()
        for entry in entries:
            audit.append(entry, generation=state.generation + 1, pre_commit=True)
        try:
            self._commit(state, session, entries)
        except BaseException:
            try:
                audit.append(make_entry(self._clock(), "system", "keystore.write", self.location, "error",
                                        "the change above was not committed"), generation=self._loaded.generation)
            except KeystoreError:
                pass
            raise

    def _audit_log(self) -> AuditLog:
        """The audit log beside the file, keyed from the master key in force (file backend only)."""
        if self.home is None:
            raise KeystoreError("internal: a database keystore keeps its audit entries in the sealed state")
        cache_key = json.dumps(self._kdf, sort_keys=True)
        if self._audit is None or self._audit[0] != cache_key:
            keys = self._envelope_keys(self._kdf)
            self._audit = (cache_key, AuditLog(self.home, keys.audit, lock_timeout=self._lock_timeout))
        return self._audit[1]

    def _commit(self, state: _State, session: WriteSession, audit: list[AuditEntry]) -> None:
        """Seal and write `state`; `audit` holds the entries this write records (for the backend)."""
        master, kdf = self._next_master or (self._master, self._kdf)
        keys = (envelope.EnvelopeKeys(master.derive(kdf, self.location)) if self._next_master
                else self._envelope_keys(kdf))
        state.generation += 1
        sealed = envelope.seal(state.to_bytes(), keys, kdf)
        snapshot = session.commit(sealed, audit)
        if self._next_master:
            self._master, self._keys = master, {json.dumps(kdf, sort_keys=True): keys}
        self._install(state, snapshot, kdf)

    def _writing(self) -> _State:
        """The open transaction's state, marked changed."""
        if self._txn is None or self._txn_thread != threading.get_ident():
            raise KeystoreError("internal: a change outside a transaction")
        self._txn_dirty = True
        return self._txn

    def _view(self) -> _State:
        """The state this thread reads: its open transaction's, else the committed one (refreshed)."""
        if self._txn is not None and self._txn_thread == threading.get_ident():
            return self._txn
        self.refresh()
        return self._loaded

    @property
    def _loaded(self) -> _State:
        """The committed state (loaded by `open` before any use)."""
        if self._state is None:
            raise KeystoreError("internal: the keystore was used before it was loaded")
        return self._state

    def _record(self, actor: str | None, action: str, target: str | None, outcome: str = "ok",
                detail: str | None = None) -> AuditEntry:
        entry = make_entry(self._clock(), actor, action, target, outcome, detail)
        self._writing()
        self._txn_audit.append(entry)
        return entry

    # -- tokens ---------------------------------------------------------------------------

    def create_token(
        self,
        name: str,
        scopes: Iterable[str] | str,
        models: Iterable[str] | str = (),
        *,
        expires_at: float | datetime | None = None,
        actor: str | None = None,
    ) -> tuple[TokenRecord, str]:
        """Make a token; returns its record and the token string, which is shown only now."""
        name = checked_name(name)
        scopes = checked_scopes(scopes)
        models = checked_models(models, scopes)
        expires = _timestamp(expires_at, "expires_at")
        with self.transaction():
            now = self._clock()
            if expires is not None and expires <= now:
                raise InvalidRecord("expires_at is not in the future")
            state = self._writing()
            token_id, secret = new_token_parts(state.tokens)
            record = TokenRecord(
                id=token_id, name=name, scopes=scopes, models=models, created_at=now,
                expires_at=expires, created_by=actor, secret_hash=hash_secret(secret),
            )
            state.tokens[token_id] = record
            self._record(actor, "token.create", token_id, detail=f"scopes={','.join(scopes)} models={','.join(models)}")
        return record, format_token(token_id, secret)

    def revoke_token(self, token_id: str, *, actor: str | None = None) -> TokenRecord:
        """Revoke a token (idempotent); TokenNotFound if the id is unknown."""
        with self.transaction():
            record = self._view().tokens.get(token_id)
            if record is None:
                raise TokenNotFound(f"no token with id {describe_token_id(token_id)} in {self.location}",
                                    path=self.location)
            if record.revoked:
                return record
            record = replace(record, revoked=True, revoked_at=self._clock())
            self._writing().tokens[token_id] = record
            self._record(actor, "token.revoke", token_id)
        return record

    def list_tokens(self) -> list[TokenRecord]:
        """Every token (revoked and expired ones too), oldest first; no secrets in them."""
        return sorted(self._view().tokens.values(), key=lambda r: (r.created_at, r.id))

    def get_token(self, token_id: str) -> TokenRecord:
        record = self._view().tokens.get(token_id)
        if record is None:
            raise TokenNotFound(f"no token with id {describe_token_id(token_id)} in {self.location}",
                                path=self.location)
        return record

    def check_token(self, token: str, *, model: str | None = None, scope: str = "segment") -> TokenCheck:
        """Check a token string for `scope` (and `model`); `.ok`, `.reason`, `.status` (200/401/403)."""
        if scope not in SCOPES:
            raise InvalidRecord(f"unknown scope {scope!r}: scopes are {', '.join(SCOPES)}")
        self.refresh()
        parts = parse_token(token)
        if parts is None:
            return TokenCheck(False, "malformed")
        return check_token(self._loaded.tokens.get(parts[0]), parts[1], self._clock(), scope, model)

    def verify_token(self, token: str, *, model: str | None = None, scope: str = "segment") -> Grant | None:
        """The token's grant if it is valid, has `scope` and (if given) is granted `model`; else None."""
        result = self.check_token(token, model=model, scope=scope)
        return result.grant if result.ok else None

    # -- model keys -----------------------------------------------------------------------

    def _versions(self, model: str) -> tuple[KeyVersion, ...]:
        versions = self._view().models.get(model)
        if not versions:
            raise ModelKeyNotFound(f"no keys for model {model!r} in {self.location}", path=self.location)
        return versions

    def _version(self, model: str, version: int) -> KeyVersion:
        for candidate in self._versions(model):
            if candidate.version == version:
                return candidate
        raise ModelKeyNotFound(f"model {model!r} has no key version {version!r} in {self.location}", path=self.location)

    def _put(self, updated: KeyVersion) -> None:
        state = self._writing()
        state.models[updated.model] = tuple(
            updated if v.version == updated.version else v for v in state.models[updated.model]
        )

    def add_model_key(
        self,
        model: str,
        kind: str,
        material: dict[str, Any],
        *,
        activate: bool = True,
        actor: str | None = None,
    ) -> KeyVersion:
        """Store a new key version for `model` ("cp" or "block"); active at once unless `activate=False`."""
        model = checked_name(model, "model name")
        material = checked_material(kind, material)
        with self.transaction():
            state = self._writing()
            versions = state.models.get(model, ())
            taken = {v.id for vs in state.models.values() for v in vs}
            key_id = new_key_id()
            while key_id in taken:
                key_id = new_key_id()
            added = KeyVersion(
                model=model, version=max((v.version for v in versions), default=0) + 1, id=key_id,
                kind=kind, state="pending", created_at=self._clock(), created_by=actor, material=material,
            )
            state.models[model] = versions + (added,)
            self._record(actor, "model_key.add", f"{model}@v{added.version}", detail=f"kind={kind} id={key_id}")
            if activate:
                added = self._activate(added, actor)
        return _material_copy(added)

    def set_active(self, model: str, version: int, *, actor: str | None = None) -> KeyVersion:
        """Make `version` the active key of `model`; the one active before becomes retiring."""
        with self.transaction():
            target = self._version(model, version)
            if target.state == "destroyed":
                raise KeyStateError(
                    f"key version {version} of model {model!r} is destroyed and cannot be activated",
                    path=self.location,
                )
            if target.state != "active":
                target = self._activate(target, actor)
        return _without_material(target)

    def _activate(self, target: KeyVersion, actor: str | None) -> KeyVersion:
        now = self._clock()
        for other in self._writing().models[target.model]:
            if other.state == "active":
                self._put(replace(other, state="retiring", retired_at=now))
                self._record(actor, "model_key.retire", f"{other.model}@v{other.version}")
        activated = replace(target, state="active", activated_at=now, retired_at=None)
        self._put(activated)
        self._record(actor, "model_key.activate", f"{target.model}@v{target.version}")
        return activated

    def destroy_model_key(self, model: str, version: int, *, actor: str | None = None) -> KeyVersion:
        """Remove a version's material for good (state "destroyed"); the active version is refused."""
        with self.transaction():
            target = self._version(model, version)
            if target.state == "active":
                raise KeyStateError(
                    f"key version {version} of model {model!r} is active: activate another version first",
                    path=self.location,
                )
            if target.state != "destroyed":
                target = replace(target, state="destroyed", destroyed_at=self._clock(), material=None)
                self._put(target)
                self._record(actor, "model_key.destroy", f"{model}@v{version}")
        return target

    def active_model_key(self, model: str) -> KeyVersion | None:
        """The active key version of `model`, with its material; None if it has none."""
        for version in self._view().models.get(model, ()):
            if version.state == "active":
                return _material_copy(version)
        return None

    def active_key_version(self, model: str, *, refresh: bool = True) -> int | None:
        """The number of `model`'s active key version, without its material (a lookup, no copy).
        `refresh=False` reads what this keystore last loaded, never the disk or the database (for a
        caller on an event loop whose token check has just refreshed it)."""
        state = self._view() if refresh else self._loaded
        for version in state.models.get(model, ()):
            if version.state == "active":
                return version.version
        return None

    def get_model_key(self, model: str, version: int) -> KeyVersion:
        """One key version with its material (None once destroyed); ModelKeyNotFound if missing."""
        return _material_copy(self._version(model, version))

    def model_key_versions(self, model: str) -> list[KeyVersion]:
        """Every version of `model`'s key, without material; [] for an unknown model."""
        return [_without_material(v) for v in self._view().models.get(model, ())]

    def models(self) -> list[str]:
        """Names of the models that have keys."""
        return sorted(self._view().models)

    # -- at-rest data keys ----------------------------------------------------------------

    def data_key(self, model: str, *, create: bool = False, actor: str | None = None) -> tuple[str, bytes] | None:
        """(id, 32 secret bytes) of `model`'s at-rest data key (DESIGN Additions "At rest"): one per
        model, for every revision; made from the OS CSPRNG on first use when `create`, else None."""
        record = self._view().data_keys.get(model)
        if record is None and create:
            model = checked_name(model, "model name")
            with self.transaction():
                state = self._writing()
                record = state.data_keys.get(model)
                if record is None:
                    record = {"id": "d" + secrets.token_hex(6),
                              "key": base64.b64encode(secrets.token_bytes(DATA_KEY_BYTES)).decode("ascii"),
                              "created_at": self._clock(), "created_by": actor}
                    state.data_keys[model] = record
                    self._record(actor, "data_key.add", model, detail=f"id={record['id']}")
        if record is None:
            return None
        return record["id"], base64.b64decode(record["key"])

    # -- audit ----------------------------------------------------------------------------

    def audit(
        self,
        action: str,
        target: str | None = None,
        outcome: str = "ok",
        *,
        actor: str | None = None,
        detail: str | None = None,
    ) -> AuditEntry:
        """Append an entry durably; secrets are scrubbed. Inside an open transaction it is written
        with that transaction's changes; outside, it is one fsynced line in the audit log (O(1),
        no keystore lock, the sealed keystore does not change). KeystoreError if it cannot be written."""
        if self._txn is not None and self._txn_thread == threading.get_ident():
            return self._record(actor, action, target, outcome, detail)
        if self.home is None:  # a database keystore: the entry is one write of the sealed state
            with self.transaction():
                return self._record(actor, action, target, outcome, detail)
        entry = make_entry(self._clock(), actor, action, target, outcome, detail)
        self._audit_log().append(entry, generation=self._view().generation)
        return entry

    def audit_log(self, *, limit: int | None = None) -> list[AuditEntry]:
        """The audit entries, oldest first (the last `limit` if given): those an older keystore
        kept inside its envelope, then the audit log's (a database keystore's are all in its envelope)."""
        entries = list(self._view().audit)
        if self.home is not None:
            entries += self._audit_log().entries(limit=limit)
        return entries[-limit:] if limit else entries

    def verify_audit(self) -> AuditReport:
        """Check the audit log's HMAC chain (see `seglock keystore audit --verify`). A database
        keystore's entries are inside the envelope, which AES-GCM authenticated when it was read."""
        self.refresh()
        if self.home is None:
            count = len(self._loaded.audit)
            return AuditReport(True, count, 0, 1 if count else 0, None)
        return self._audit_log().verify()

    # -- master key -----------------------------------------------------------------------

    def change_master_key(
        self,
        new: MasterKey | None = None,
        *,
        scrypt: ScryptParams | None = None,
        actor: str | None = None,
    ) -> MasterKey:
        """Re-encrypt under `new` in one atomic write; returns the master key now in force.

        With no `new`, a keystore opened with its `master.key` gets a fresh random key there:
        `master.key.new` is written first and renamed over `master.key` after the keystore, and
        `Keystore.open` finishes the rename if a crash fell between the two.
        """
        if self._txn is not None:
            raise KeystoreError("change the master key outside any transaction")
        old = self._master
        pending = None
        home = self.home  # the file backend's folder, where a generated key goes
        if new is None:
            if old.file is None or home is None:
                raise MasterKeyError(
                    "give the new master key (SEGLOCK_NEW_MASTER_KEY(_FILE) or SEGLOCK_NEW_MASTER_PASSPHRASE(_FILE)); "
                    f"only a keystore opened with its {MASTER_KEY_FILENAME} gets a generated one"
                )
            pending = home / PENDING_MASTER_KEY_FILENAME
            new = MasterKey.generate(str(pending), file=pending)
        with self.transaction():
            if pending is not None:
                os.close(fsio.atomic_replace(pending, (new.to_base64() + "\n").encode("ascii")))
            self._next_master = (new, new.new_kdf(scrypt or self._scrypt))
            to = f"a new generated key in {old.file}" if pending is not None else new.origin
            self._record(actor, "keystore.change_master_key", self.location, detail=f"from {old.origin} to {to}")
        if pending is not None:
            # a generated key is made only for a keystore opened with its file, in its home folder
            assert old.file is not None and home is not None
            os.replace(pending, old.file)
            fsio.fsync_dir(home)
            self._master = read_master_key_file(old.file)
        elif old.file is not None:
            log.warning(
                "%s no longer opens %s; delete it once no backup encrypted under it is kept", old.file, self.location
            )
        return self._master

    # -- moving to another backend -----------------------------------------------------------

    def copy_to(self, url: str, *, actor: str | None = None, env: Mapping[str, str] | None = None) -> Keystore:
        """Copy this keystore, every token, key version and audit entry, into the empty database
        keystore `url` (its schema made or migrated first), sealed under the same master key; the
        copy's log ends with a `keystore.migrate` entry. KeystoreExists if `url` holds one already."""
        if self._txn is not None:
            raise KeystoreError("copy a keystore outside any transaction")
        storage = open_storage(None, {} if env is None else env, url=url, lock_timeout=self._lock_timeout)
        try:
            storage.prepare()
            with self._mutex, storage.writing() as session:
                if session.exists:
                    raise KeystoreExists(
                        f"a keystore already exists at {storage.location}; it was left as it is", path=storage.location)
                state = self._view().copy()
                target = Keystore(storage, self._master, clock=self._clock, scrypt=self._scrypt,
                                  lock_timeout=self._lock_timeout)
                target._kdf = self._kdf
                state.audit = self.audit_log()  # a file keystore's entries too (its segment files)
                migrate = make_entry(self._clock(), actor, "keystore.migrate", storage.location, "ok",
                                     f"from {self.location}")
                state.audit.append(migrate)
                del state.audit[:-DB_AUDIT_KEEP]
                target._commit(state, session, [migrate])
        except BaseException:
            storage.close()
            raise
        log.info("copied the keystore at %s to %s (generation %d)", self.location, storage.location,
                 target.generation)
        return target

    # -- status ---------------------------------------------------------------------------

    @property
    def storage(self) -> Storage:
        """The backend holding the sealed envelope (the file, or the database row)."""
        return self._storage

    @property
    def generation(self) -> int:
        """How many writes the file has seen."""
        return self._view().generation

    @property
    def master_key_origin(self) -> str:
        """Where the master key came from (a variable name or a file path; never the key)."""
        return self._master.origin

    @property
    def master_key_file(self) -> Path | None:
        """The master.key file in use, if the key came from one (a development setup)."""
        return self._master.file

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary without secrets (what `seglock keystore status` prints)."""
        state = self._view()
        now = self._clock()
        token_states = {"active": 0, "revoked": 0, "expired": 0}
        for record in state.tokens.values():
            token_states[record.status(now)] += 1
        kdf = {k: v for k, v in self._kdf.items() if k != "salt"}
        return {
            **self._storage.describe(),
            "format_version": envelope.FORMAT_VERSION,
            "cipher": envelope.CIPHER,
            "kdf": kdf,
            "master_key_source": self._master.origin,
            "generation": state.generation,
            "created_at": state.created_at,
            "tokens": token_states,
            "models": {
                model: [{"version": v.version, "id": v.id, "kind": v.kind, "state": v.state} for v in versions]
                for model, versions in sorted(state.models.items())
            },
            "audit_entries": len(state.audit) + (len(self._audit_log().entries()) if self.home is not None else 0),
            "data_keys": sorted(state.data_keys),  # models whose weights are encrypted at rest (ids only)
        }

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Release what this keystore holds (the file's descriptor; the database's connections)."""
        with self._mutex:
            if self._snapshot is not None:
                self._storage.release(self._snapshot)
                self._snapshot = None
            self._storage.close()

    def __enter__(self) -> Keystore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        snapshot = getattr(self, "_snapshot", None)
        if snapshot is not None and isinstance(snapshot.handle, int):
            try:
                os.close(snapshot.handle)
            except OSError:
                pass

    def __repr__(self) -> str:
        state = self._state
        counts = (f" generation={state.generation} tokens={len(state.tokens)} models={len(state.models)}"
                  if state else "")
        return f"<Keystore {self.location}{counts}>"
