"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SECRET_FILE_MODE = 0o600


def temp_prefix(path: Path) -> str:
    """The name prefix of `path`'s temp files, so stale ones can be found and removed."""
    return f".{path.name}."


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes) -> tuple[int, str]:
    """Write `data` to a fresh 0600 temp file beside `path`, fsynced; returns (open fd, name)."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, SECRET_FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def atomic_replace(path: Path, data: bytes) -> int:
    """Replace `path` with `data` atomically and durably; returns an open read fd on the new file.

    The fd pins the new inode, so a later stat can tell this file from any that replaces it.
    """
    fd, tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def atomic_create(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists (never overwrites); True when created."""
    fd, tmp = _write_temp(path, data)
    os.close(fd)
    try:
        os.link(tmp, path)  # link fails if `path` exists: no window where a second writer wins
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def remove_stale_temps(path: Path) -> None:
    """Remove temp files a killed writer left beside `path` (call only while holding the lock)."""
    prefix = temp_prefix(path)
    for entry in os.scandir(path.parent):
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
