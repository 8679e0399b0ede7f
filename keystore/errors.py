"""The keystore's errors: one base class, one subclass per thing that can go wrong.

Messages are one line, name the file, say what to do, and never hold a secret.
`user_error` tells the command line which errors are the caller's to fix (exit code 2).
"""

from __future__ import annotations

from pathlib import Path


class KeystoreError(Exception):
    """Base class of every keystore error."""

    user_error = False

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(message)
        # A database keystore is named by its URL (password removed), which is not a path.
        self.path = Path(path) if path is not None and "://" not in str(path) else path


class KeystoreNotFound(KeystoreError):
    """No keystore file where one was expected."""

    user_error = True


class KeystoreExists(KeystoreError):
    """A keystore already exists where a new one was to be made."""

    user_error = True


class MasterKeyError(KeystoreError):
    """The master key settings are missing, malformed or contradictory."""

    user_error = True


class WrongMasterKey(KeystoreError):
    """The master key given does not open this keystore."""

    user_error = True


class KeystoreCorrupt(KeystoreError):
    """The keystore file is damaged: it does not parse or its checksum does not match."""


class KeystoreTruncated(KeystoreCorrupt):
    """The keystore file ends early."""


class KeystoreTampered(KeystoreCorrupt):
    """The checksum matches and the master key is right, yet authentication fails."""


class UnsupportedFormatVersion(KeystoreError):
    """The keystore was written in a format version this seglock cannot read."""


class KeystoreRolledBack(KeystoreError):
    """The keystore file is authentic but older than one already seen (a restore or a replay)."""


class KeystoreLocked(KeystoreError):
    """Another process held the keystore's lock for too long."""


class KeystoreUnavailable(KeystoreError):
    """The keystore's database cannot be reached (or refused the work); try again shortly."""


class TokenNotFound(KeystoreError):
    """No token with that id."""

    user_error = True


class ModelKeyNotFound(KeystoreError):
    """No key (or no such key version) for that model."""

    user_error = True


class KeyStateError(KeystoreError):
    """The operation does not fit the key version's state (e.g. destroying the active key)."""

    user_error = True


class InvalidRecord(KeystoreError, ValueError):
    """An argument for a new record is malformed (bad scope, empty name, bad material)."""

    user_error = True
