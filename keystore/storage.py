"""Where the sealed keystore lives: one small interface, a file backend and (in `postgres.py`) a database.

The keystore's state logic and its AES-GCM envelope live in `store.py` and never change with the
backend; a backend only stores the sealed bytes (ciphertext and hashes, nothing a dump could open
without the master key) and gives writers an exclusive section:

    storage.location                 where it is, for messages (a path, or a URL without password)
    storage.prepare()                make the place ready (the folder; the schema and its migrations)
    storage.exists() -> bool
    storage.load() -> Snapshot       the sealed bytes and their version; KeystoreNotFound if absent
    storage.current_version()        cheap: has someone else written since? (file: one stat;
                                     database: the newest version LISTEN/NOTIFY or the re-check saw)
    storage.adopt(s) / release(s)    keep / drop what pins a loaded snapshot (the file's inode)
    with storage.writing() as w:     exclusive across processes and hosts (flock / SELECT ... FOR UPDATE)
        w.exists, w.version, w.load(), w.commit(sealed, audit) -> Snapshot
    storage.fresh_enough() -> bool   may reads go on from memory while the store cannot be reached?
    storage.describe() -> dict;  storage.close()

`commit(sealed, audit)` is the one place a write happens; `audit` holds the entries this write
appends. Today both backends keep the log inside the envelope, so `audit` is already in `sealed`;
a backend that moves the log elsewhere (append-only, tamper-evident) writes it here, in the same
transaction as the state.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import filelock

from seglock.client import fsio
from seglock.keystore.audit import AuditEntry
from seglock.keystore.errors import KeystoreError, KeystoreLocked, KeystoreNotFound

KEYSTORE_FILENAME = "keystore.json"
LOCK_FILENAME = "keystore.json.lock"
URL_VARIABLE = "SEGLOCK_KEYSTORE_URL"  # or SEGLOCK_KEYSTORE_URL_FILE, a file holding it (credentials)


class KeystoreURLError(KeystoreError):
    """The keystore URL settings are missing, malformed or contradictory."""

    user_error = True


def keystore_url(env: Mapping[str, str]) -> str | None:
    """The database URL `SEGLOCK_KEYSTORE_URL` or the file `SEGLOCK_KEYSTORE_URL_FILE` names; None = a file keystore."""
    direct, from_file = env.get(URL_VARIABLE), env.get(f"{URL_VARIABLE}_FILE")
    if direct and from_file:
        raise KeystoreURLError(f"both {URL_VARIABLE} and {URL_VARIABLE}_FILE are set: set only one")
    if from_file:
        try:
            direct = Path(from_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise KeystoreURLError(f"{URL_VARIABLE}_FILE={from_file}: cannot read it ({reason})") from None
        if not direct:
            raise KeystoreURLError(f"{URL_VARIABLE}_FILE={from_file} is empty")
    return direct or None


MAX_STALE_VARIABLE = "SEGLOCK_KEYSTORE_MAX_STALE_S"
DEFAULT_MAX_STALE_S = 30.0


def max_stale_seconds(env: Mapping[str, str]) -> float:
    """How long a database keystore's readers go on from memory when the database is out of reach."""
    text = env.get(MAX_STALE_VARIABLE)
    if text is None:
        return DEFAULT_MAX_STALE_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise KeystoreURLError(f"{MAX_STALE_VARIABLE} must be seconds between 0 and 86400, got {text!r}")
    return value


def open_storage(home: str | os.PathLike[str] | None, env: Mapping[str, str], *, url: str | None = None,
                 lock_timeout: float) -> Storage:
    """The backend for `url` (else the environment's URL), or the file in `home`."""
    url = url or keystore_url(env)
    if url:
        from seglock.keystore.postgres import PostgresStorage  # psycopg only where a database is used

        return PostgresStorage(url, lock_timeout=lock_timeout, max_stale_s=max_stale_seconds(env))
    if home is None:
        raise KeystoreURLError(f"give a home folder (--home) for a file keystore, or a database URL ({URL_VARIABLE})")
    return FileStorage(Path(home), lock_timeout=lock_timeout)


@dataclass
class Snapshot:
    """Sealed keystore bytes as read or written, and the version that tells them apart."""

    data: bytes
    version: Hashable
    handle: Any = None  # what keeps `version` meaningful while the snapshot is in use (the file's fd)


class WriteSession(Protocol):
    exists: bool
    version: Hashable | None

    def load(self) -> Snapshot: ...

    def commit(self, sealed: bytes, audit: Sequence[AuditEntry]) -> Snapshot: ...


class Storage(Protocol):
    location: str
    kind: str

    def prepare(self) -> list[int]: ...

    def exists(self) -> bool: ...

    def load(self) -> Snapshot: ...

    def current_version(self) -> Hashable: ...

    def adopt(self, snapshot: Snapshot) -> None: ...

    def release(self, snapshot: Snapshot) -> None: ...

    def writing(self) -> Any: ...  # a context manager yielding a WriteSession

    def fresh_enough(self) -> bool: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


# -- the file backend --------------------------------------------------------------------------

_Stamp = tuple[int, int, int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    # The inode is pinned by an open fd, so a replacement can never reuse it; size and times
    # catch an in-place rewrite (a restore from backup with `cp`).
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _FileWrite:
    def __init__(self, storage: FileStorage) -> None:
        self._storage = storage
        try:
            self.version: _Stamp | None = _stamp(os.stat(storage.path))
        except FileNotFoundError:
            self.version = None
        self.exists = self.version is not None

    def load(self) -> Snapshot:
        return self._storage.load()

    def commit(self, sealed: bytes, audit: Sequence[AuditEntry]) -> Snapshot:
        # `audit` is inside `sealed`: the file keeps the log in the envelope.
        fd = fsio.atomic_replace(self._storage.path, sealed)
        return Snapshot(sealed, _stamp(os.fstat(fd)), fd)


class FileStorage:
    """`HOME/keystore.json`: atomic replace under a file lock; one stat tells a change."""

    kind = "file"

    def __init__(self, home: Path, *, lock_timeout: float) -> None:
        self.home = Path(home)
        self.path = self.home / KEYSTORE_FILENAME
        self.location = str(self.path)
        self._lock_timeout = lock_timeout
        self._flock = filelock.FileLock(str(self.home / LOCK_FILENAME), mode=0o600)

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> Snapshot:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise KeystoreNotFound(f"{self.path} has disappeared; restore it from a backup", path=self.path) from None
        try:
            st = os.fstat(fd)  # the stamp of exactly the bytes we read, even if the file is replaced now
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        except BaseException:
            os.close(fd)
            raise
        return Snapshot(b"".join(chunks), _stamp(st), fd)

    def current_version(self) -> _Stamp:
        try:
            return _stamp(os.stat(self.path))
        except FileNotFoundError:
            raise KeystoreNotFound(f"{self.path} has disappeared; restore it from a backup", path=self.path) from None

    def adopt(self, snapshot: Snapshot) -> None:
        pass  # the Keystore keeps the snapshot, and with it the fd, until the next one is installed

    def release(self, snapshot: Snapshot) -> None:
        if snapshot.handle is not None:
            os.close(snapshot.handle)
            snapshot.handle = None

    def prepare(self) -> list[int]:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return []

    @contextmanager
    def writing(self) -> Iterator[_FileWrite]:
        try:
            self._flock.acquire(timeout=self._lock_timeout)
        except filelock.Timeout:
            raise KeystoreLocked(
                f"{self.path}: another process held the keystore lock for {self._lock_timeout:g} s; try again",
                path=self.path,
            ) from None
        try:
            session = _FileWrite(self)
            if session.exists:
                fsio.remove_stale_temps(self.path)
            yield session
        finally:
            self._flock.release()

    def fresh_enough(self) -> bool:
        return True  # a file is there or it is not: nothing to wait out

    def describe(self) -> dict[str, Any]:
        st = os.stat(self.path)
        return {"backend": "file", "path": str(self.path), "file_mode": oct(st.st_mode & 0o777),
                "file_bytes": st.st_size}

    def close(self) -> None:
        pass
