"""Crash-safe file writes, the one copy every part uses: temp file in the same directory, write,
fsync, rename, fsync of the directory. A crash at any point leaves the old file or the new one.

Standard library only, and in the lowest layer (the SDK, which every install has), so that the
keystore (no torch), models, the server and the client may all import it (DESIGN "Parts").

    write_atomic(path, data, mode=0o600)             # bytes, replacing any old file
    with atomic_writer(path, mode=0o600) as tmp:     # streaming writers that want a path or a file:
        torch.save(obj, tmp)                         #   write `tmp`; it replaces `path` on success
    with atomic_directory(out_dir) as tmp:           # a folder of files swapped in as one
        (tmp / "a.json").write_text(...)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SECRET_FILE_MODE = 0o600
TEMP_SUFFIX = ".tmp"

__all__ = [
    "SECRET_FILE_MODE",
    "atomic_create",
    "atomic_directory",
    "atomic_replace",
    "atomic_writer",
    "fsync_dir",
    "fsync_file",
    "remove_stale_temps",
    "temp_prefix",
    "write_atomic",
]


def temp_prefix(path: Path) -> str:
    """The name prefix of `path`'s temp files, so stale ones can be found and removed."""
    return f".{path.name}."


def fsync_dir(directory: Path) -> None:
    """Make a rename (or a new entry) in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp(path: Path, mode: int) -> tuple[int, str]:
    """A fresh empty temp file beside `path` with `mode` from the start (mkstemp makes it 0600, so
    a secret is never readable by others, not even briefly); returns (open fd, name)."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _write_temp(path: Path, data: bytes, mode: int) -> tuple[int, str]:
    """Write `data` to a fresh temp file beside `path`, fsynced; returns (open fd, name)."""
    fd, tmp = _new_temp(path, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def atomic_replace(path: Path, data: bytes, *, mode: int = SECRET_FILE_MODE) -> int:
    """Replace `path` with `data` atomically and durably; returns an open read fd on the new file.

    The fd pins the new inode, so a later stat can tell this file from any that replaces it.
    """
    path = Path(path)
    fd, tmp = _write_temp(path, data, mode)
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


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = SECRET_FILE_MODE) -> Path:
    """Replace `path` with `data` atomically and durably (file mode `mode`); returns the path."""
    path = Path(path)
    os.close(atomic_replace(path, data, mode=mode))
    return path


def atomic_create(path: str | os.PathLike[str], data: bytes, *, mode: int = SECRET_FILE_MODE) -> bool:
    """Create `path` holding `data` unless it exists (never overwrites); True when created."""
    path = Path(path)
    fd, tmp = _write_temp(path, data, mode)
    os.close(fd)
    try:
        os.link(tmp, path)  # link fails if `path` exists: no window where a second writer wins
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
    return True


@contextmanager
def atomic_writer(path: str | os.PathLike[str], *, mode: int = SECRET_FILE_MODE) -> Iterator[Path]:
    """For writers that stream to a path or a file object (safetensors, torch.save): yields the
    path of an empty temp file (already `mode`) beside `path`; write it, and on a normal exit it
    is fsynced and renamed over `path`, then the directory is fsynced. If the body raises, the
    temp file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = _new_temp(path, mode)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_directory(path: str | os.PathLike[str], *, mode: int = 0o755) -> Iterator[Path]:
    """A folder swapped in as one: yields an empty temp folder beside `path`; on a normal exit
    every file in it and the folder itself are fsynced, it replaces `path` (an old folder there is
    moved aside, then removed), and the parent is fsynced. If the body raises, the temp folder is
    removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent))
    old: Path | None = None
    try:
        yield tmp
        for entry in sorted(tmp.rglob("*")):
            if entry.is_file() and not entry.is_symlink():
                fsync_file(entry)
        fsync_dir(tmp)
        os.chmod(tmp, mode)
        if path.exists() or path.is_symlink():
            old = path.with_name(f"{temp_prefix(path)}{os.getpid()}.{tmp.name}.old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)  # the swap failed half-way: put the old folder back
        raise
    fsync_dir(path.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def remove_stale_temps(path: Path) -> None:
    """Remove temp files a killed writer left beside `path` (call only while holding the lock)."""
    prefix = temp_prefix(path)
    for entry in os.scandir(path.parent):
        if entry.name.startswith(prefix) and entry.name.endswith(TEMP_SUFFIX):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
