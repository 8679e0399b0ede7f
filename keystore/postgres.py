"""The PostgreSQL backend: the same sealed envelope in one row, shared by every host.

    seglock_schema(version, applied_at)                     migrations applied, in order
    seglock_keystore(id = 1, version, envelope, updated_at) the sealed envelope (ciphertext and
                                                            hashes only) and a write counter

A write is one database transaction: `SELECT ... FOR UPDATE` on the row replaces flock, the
new envelope is written with `version + 1`, and `pg_notify('seglock_keystore', version)` goes
out with the commit (the payload is `<schema>:<version>`, so keystores in several schemas of
one database, chosen with `?options=-csearch_path%3D<schema>`, stay apart). Every process
LISTENs on a background connection (and re-checks the version every `recheck_s` in case a
notification is lost), so a revocation, a new token or a rotation is seen on every host within
a second. A dump of the database opens nothing without the master key.

When the database cannot be reached, writes fail at once with `KeystoreUnavailable` (servers
answer 503 with Retry-After) and reads go on from the last good state for `max_stale_s`
seconds after the last contact; after that they fail too, until the database is back.
Reconnection is automatic (the pool checks connections before use; the listener reconnects).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import conninfo, errors
from psycopg_pool import ConnectionPool

from seglock.keystore.audit import AuditEntry
from seglock.keystore.errors import KeystoreError, KeystoreLocked, KeystoreNotFound, KeystoreUnavailable
from seglock.keystore.storage import DEFAULT_MAX_STALE_S, Snapshot

log = logging.getLogger("seglock.keystore")

CHANNEL = "seglock_keystore"
DEFAULT_RECHECK_S = 0.5
CONNECT_TIMEOUT_S = 3
_SCHEMA_LOCK = 0x5E61_0C4B  # pg_advisory_xact_lock key: one migrator at a time

# Versioned schema: entry i brings the schema from version i to i + 1. Never edit an entry
# that has shipped; append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE seglock_keystore (
        id         smallint PRIMARY KEY CHECK (id = 1),
        version    bigint NOT NULL,
        envelope   bytea,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO seglock_keystore (id, version, envelope) VALUES (1, 0, NULL);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def redacted(url: str) -> str:
    """`postgresql://user@host:port/db`: the URL without its password, for messages and logs."""
    try:
        parts = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise KeystoreUnavailable("the keystore URL is not a valid PostgreSQL URL or conninfo string") from None
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def _unavailable(location: str, exc: BaseException) -> KeystoreError:
    if isinstance(exc, errors.LockNotAvailable):
        return KeystoreLocked(f"{location}: another process held the keystore row lock too long; try again",
                              path=location)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return KeystoreUnavailable(f"{location}: the database cannot be used right now ({first_line})", path=location)


def _fetched(row: tuple[Any, ...] | None, location: str, query: str) -> tuple[Any, ...]:
    """The row of a query that always returns one (an aggregate, `current_schema()`)."""
    if row is None:
        raise KeystoreError(f"{location}: the database returned no row for `{query}`", path=location)
    return row


def _keystore_row(row: tuple[Any, ...] | None, location: str) -> tuple[Any, ...]:
    """The keystore row (id = 1, made with the schema); KeystoreNotFound if it has been deleted."""
    if row is None:
        raise KeystoreNotFound(f"{location}: the keystore row (id 1 of seglock_keystore) is missing; "
                               "restore the database from a backup", path=location)
    return row


def migrate_schema(conn: psycopg.Connection, location: str) -> list[int]:
    """Apply the migrations `conn`'s database lacks, in one transaction; returns the versions applied."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS seglock_schema ("
                     " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        query = "SELECT coalesce(max(version), 0) FROM seglock_schema"
        current = _fetched(conn.execute(query).fetchone(), location, query)[0]
        if current > SCHEMA_VERSION:
            raise KeystoreError(f"{location} has keystore schema version {current}; this seglock knows up to "
                                f"{SCHEMA_VERSION}: use a seglock that knows it", path=location)
        applied = []
        for version in range(current + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO seglock_schema (version) VALUES (%s)", (version,))
            applied.append(version)
    if applied:
        log.info("keystore schema at %s migrated to version %d", location, SCHEMA_VERSION)
    return applied


class _PostgresWrite:
    """One write transaction, the keystore row locked FOR UPDATE until commit or rollback."""

    def __init__(self, storage: PostgresStorage, conn: psycopg.Connection) -> None:
        self._storage, self._conn = storage, conn
        row = conn.execute("SELECT version, envelope IS NOT NULL FROM seglock_keystore WHERE id = 1 FOR UPDATE"
                           ).fetchone()
        self.exists = bool(row and row[1])
        self.version = row[0] if row is not None and self.exists else None
        self.committed = False

    def load(self) -> Snapshot:
        row = self._conn.execute("SELECT version, envelope FROM seglock_keystore WHERE id = 1").fetchone()
        return self._storage._snapshot_of(row)

    def commit(self, sealed: bytes, audit: Sequence[AuditEntry]) -> Snapshot:
        # `audit` is inside `sealed`: this backend keeps the log in the envelope too. A separate,
        # append-only audit table would be written here, in this same transaction.
        try:
            version = _keystore_row(self._conn.execute(
                "UPDATE seglock_keystore SET envelope = %s, version = version + 1, updated_at = now() "
                "WHERE id = 1 RETURNING version", (sealed,)).fetchone(), self._storage.location)[0]
            # The payload names the schema: keystores in several schemas of one database stay apart.
            self._conn.execute("SELECT pg_notify(%s, current_schema() || ':' || %s)", (CHANNEL, str(version)))
            self._conn.commit()
        except psycopg.Error as exc:
            raise _unavailable(self._storage.location, exc) from None
        self.committed = True
        self._storage._seen(version)
        return Snapshot(sealed, version)


class PostgresStorage:
    """The sealed keystore in a PostgreSQL row; a connection pool for work, one connection to LISTEN."""

    kind = "postgresql"

    def __init__(self, url: str, *, lock_timeout: float = 30.0, recheck_s: float = DEFAULT_RECHECK_S,
                 max_stale_s: float | None = None, pool_size: int = 4) -> None:
        self.location = redacted(url)
        self._url = url
        self._lock_timeout_ms = int(lock_timeout * 1000)
        self.recheck_s = recheck_s
        self.max_stale_s = DEFAULT_MAX_STALE_S if max_stale_s is None else max_stale_s
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT_S, open=True,
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "seglock"},
            check=ConnectionPool.check_connection, name="seglock-keystore")
        self._state_lock = threading.Lock()
        self._latest = -1  # the newest version this process knows the database holds
        self._contact = float("-inf")  # monotonic time of the last successful exchange with the database
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<PostgresStorage {self.location}>"

    # -- what every backend does --------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise _unavailable(self.location, exc) from None

    def prepare(self) -> list[int]:
        """Bring the schema to the current version (what `seglock keystore init` runs)."""
        with self._connection() as conn:
            conn.commit()
            return migrate_schema(conn, self.location)

    def schema_version(self) -> int:
        with self._connection() as conn:
            try:
                query = "SELECT coalesce(max(version), 0) FROM seglock_schema"
                version: int = _fetched(conn.execute(query).fetchone(), self.location, query)[0]
                return version
            except errors.UndefinedTable:
                return 0

    def exists(self) -> bool:
        with self._connection() as conn:
            try:
                row = conn.execute("SELECT envelope IS NOT NULL FROM seglock_keystore WHERE id = 1").fetchone()
            except errors.UndefinedTable:
                return False
            return bool(row and row[0])

    def _snapshot_of(self, row: tuple[Any, ...] | None) -> Snapshot:
        if row is None or row[1] is None:
            raise KeystoreNotFound(
                f"no keystore at {self.location}: run `seglock keystore init --keystore URL`", path=self.location)
        self._seen(row[0])
        return Snapshot(bytes(row[1]), row[0])

    def load(self) -> Snapshot:
        with self._connection() as conn:
            try:
                row = conn.execute("SELECT version, envelope FROM seglock_keystore WHERE id = 1").fetchone()
            except errors.UndefinedTable:
                row = None
            return self._snapshot_of(row)

    def current_version(self) -> int:
        self._follow()
        if not self.fresh_enough():
            age = time.monotonic() - self._contact
            raise KeystoreUnavailable(
                f"{self.location}: no contact with the database for {age:.0f} s (reads from memory stop after "
                f"{self.max_stale_s:g} s); try again once it is back", path=self.location)
        return self._latest

    def adopt(self, snapshot: Snapshot) -> None:
        pass

    def release(self, snapshot: Snapshot) -> None:
        pass

    @contextmanager
    def writing(self) -> Iterator[_PostgresWrite]:
        try:
            conn = self._pool.getconn()
        except psycopg.Error as exc:
            raise _unavailable(self.location, exc) from None
        session = None
        try:
            try:
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{self._lock_timeout_ms}ms",))
                session = _PostgresWrite(self, conn)
            except errors.UndefinedTable:
                raise KeystoreNotFound(f"no keystore schema at {self.location}: run `seglock keystore init "
                                       "--keystore URL`", path=self.location) from None
            except psycopg.Error as exc:
                raise _unavailable(self.location, exc) from None
            yield session
        finally:
            if session is None or not session.committed:
                try:
                    conn.rollback()
                except psycopg.Error:
                    pass  # a broken connection: the pool's check replaces it
            self._pool.putconn(conn)

    def fresh_enough(self) -> bool:
        return time.monotonic() - self._contact <= self.max_stale_s

    @contextmanager
    def exclusive(self, name: str, timeout: float = 600.0) -> Iterator[None]:
        """A lock named `name` held across every host (a session advisory lock), e.g. one model's rotation."""
        with self._connection() as conn:
            conn.autocommit = True
            try:
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(timeout * 1000)}ms",))
                conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (name,))
            except psycopg.Error as exc:
                raise _unavailable(self.location, exc) from None
            try:
                yield
            finally:
                try:
                    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (name,))
                    conn.execute("RESET lock_timeout")
                except psycopg.Error:
                    pass  # the session is gone, and its lock with it
                conn.autocommit = False

    def describe(self) -> dict[str, Any]:
        with self._connection() as conn:
            version, size, updated = _keystore_row(conn.execute(
                "SELECT version, octet_length(envelope), updated_at FROM seglock_keystore WHERE id = 1").fetchone(),
                self.location)
        return {"backend": "postgresql", "path": self.location, "schema_version": self.schema_version(),
                "row_version": version, "envelope_bytes": size, "updated_at": updated.isoformat()}

    def close(self) -> None:
        self._stop.set()
        self._pool.close(timeout=2)

    # -- following other hosts' writes ---------------------------------------------------------

    def _seen(self, version: int, *, exact: bool = False) -> None:
        """Note a version the database holds: `exact` from a re-check (so a restore from backup,
        which moves the counter back, is followed too), else the newest of what was heard."""
        with self._state_lock:
            self._latest = version if exact else max(self._latest, version)
            self._contact = time.monotonic()

    def _follow(self) -> None:
        """Start the LISTEN thread on first use (a command that never reads twice never starts one)."""
        if self._listener is None and not self._stop.is_set():
            with self._state_lock:
                if self._listener is None:
                    self._listener = threading.Thread(target=self._listen, name="seglock-keystore-listen",
                                                      daemon=True)
                    self._listener.start()

    def _listen(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                     application_name="seglock-listen") as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    schema = _fetched(conn.execute("SELECT current_schema()").fetchone(), self.location,
                                      "SELECT current_schema()")[0]
                    backoff = 0.2
                    while not self._stop.is_set():
                        # The re-check: a notification lost while reconnecting is caught here.
                        row = conn.execute("SELECT version FROM seglock_keystore WHERE id = 1").fetchone()
                        self._seen(_keystore_row(row, self.location)[0], exact=True)
                        for note in conn.notifies(timeout=self.recheck_s):
                            where, _, version = note.payload.rpartition(":")
                            if where == schema and version.isdigit():
                                self._seen(int(version))
            except (psycopg.Error, KeystoreError, TypeError) as exc:  # KeystoreError: the row is gone
                if self._stop.is_set():
                    return
                log.warning("keystore listener: %s; reconnecting", _unavailable(self.location, exc))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
