"""The audit log: append-only, HMAC-chained segment files beside keystore.json; never a secret.

Entries live outside the sealed keystore, so an entry costs one fsynced line, not a re-encryption
of the whole keystore. A change's entries are written before the change is committed: a change
whose record cannot be written is not made. Keystores written before this kept their entries
inside the envelope; those are still read (`Keystore.audit_log`) and never grow.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import filelock

from seglock.client import fsio
from seglock.keystore.errors import InvalidRecord, KeystoreError, KeystoreLocked

OUTCOMES = ("ok", "denied", "error")
MAX_FIELD = 500
# A token that slips into a field is cut to its id: the log must never hold a secret.
_TOKEN_LIKE = re.compile(r"(slk_[0-9a-f]{12})_[0-9A-Za-z]+")


def scrub(text: str) -> str:
    """`text` with any token secret replaced by "[redacted]"."""
    return _TOKEN_LIKE.sub(r"\1_[redacted]", text)


@dataclass(frozen=True)
class AuditEntry:
    """time (epoch seconds), acting token id (or "cli"/"system"), action, target, outcome, detail."""

    time: float
    actor: str | None
    action: str
    target: str | None
    outcome: str
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "detail": self.detail,
        }

    @cached_property
    def json_text(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditEntry:
        return cls(**data)


def make_entry(
    time: float, actor: str | None, action: str, target: str | None, outcome: str, detail: str | None
) -> AuditEntry:
    """A checked, scrubbed entry."""
    if outcome not in OUTCOMES:
        raise InvalidRecord(f"audit outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    if not isinstance(action, str) or not action:
        raise InvalidRecord("an audit action must be a non-empty string")
    fields: list[str | None] = []
    for name, value in (("actor", actor), ("action", action), ("target", target), ("detail", detail)):
        if value is None:
            fields.append(None)
            continue
        if not isinstance(value, str):
            raise InvalidRecord(f"audit {name} must be a string or None")
        fields.append(scrub(value)[:MAX_FIELD])
    actor, scrubbed_action, target, detail = fields
    assert scrubbed_action is not None  # checked to be a non-empty string above
    return AuditEntry(time, actor, scrubbed_action, target, outcome, detail)


# -- the log on disk ----------------------------------------------------------------------

SEGMENT_PREFIX = "keystore.audit-"
SEGMENT_SUFFIX = ".jsonl"
LOCK_NAME = "keystore.audit.lock"
SEGMENT_BYTES = 4 << 20  # a segment is closed once it holds this much
KEEP_SEGMENTS = 16  # the oldest segments beyond these are deleted: disk use stays bounded
_GENESIS = "0" * 64
_TAIL_BYTES = 8192  # more than one line (fields are capped at MAX_FIELD characters)
_SEGMENT = re.compile(re.escape(SEGMENT_PREFIX) + r"(\d{6})" + re.escape(SEGMENT_SUFFIX))


def _canonical(line: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in line.items() if k != "mac"}, separators=(",", ":"),
                      sort_keys=True, allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class AuditReport:
    """What `verify` found: `ok`, how many entries and segments, the first sequence number kept,
    and the first problem (None when ok). Entries under an earlier master key are chain-checked only."""

    ok: bool
    entries: int
    segments: int
    first_seq: int
    problem: str | None = None
    earlier_key_entries: int = 0


class AuditLog:
    """Append-only audit entries in segment files `keystore.audit-NNNNNN.jsonl` beside the keystore.

    Each line is an entry plus `seq`, `gen` (the keystore generation it belongs to), `k` (which
    master key MACs it), `prev` (the previous line's MAC) and `mac` = HMAC-SHA256 over the rest,
    keyed from the master key (HKDF), so a line edited, removed, reordered or forged without the
    master key breaks the chain. An append reads only the tail of the newest segment (O(1)); a
    full segment starts the next one and the oldest beyond `keep_segments` is deleted.
    A backend that keeps keys elsewhere (e.g. PostgreSQL) implements the same `append/entries/verify`.
    """

    def __init__(self, folder: Path, mac_key: bytes, *, segment_bytes: int = SEGMENT_BYTES,
                 keep_segments: int = KEEP_SEGMENTS, lock_timeout: float = 10.0) -> None:
        self.folder = Path(folder)
        self._key = mac_key
        self.key_id = hmac.new(mac_key, b"seglock audit key id", hashlib.sha256).hexdigest()[:16]
        self.segment_bytes = segment_bytes
        self.keep_segments = max(1, keep_segments)
        self._lock = filelock.FileLock(str(self.folder / LOCK_NAME), mode=0o600)
        self._lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"<AuditLog {self.folder}>"

    def _mac(self, line: dict[str, Any]) -> str:
        return hmac.new(self._key, _canonical(line), hashlib.sha256).hexdigest()

    def segments(self) -> list[Path]:
        found = [(int(m.group(1)), self.folder / name) for name in os.listdir(self.folder)
                 if (m := _SEGMENT.fullmatch(name))]
        return [path for _, path in sorted(found)]

    def append(self, entry: AuditEntry, *, generation: int | None = None, pre_commit: bool = False) -> None:
        """Write one entry durably (fsync) before returning; KeystoreError if it cannot be written."""
        try:
            self._lock.acquire(timeout=self._lock_timeout)
        except filelock.Timeout:
            raise KeystoreLocked(f"{self.folder / LOCK_NAME}: the audit log is locked; try again",
                                 path=self.folder / LOCK_NAME) from None
        try:
            self._append_locked(entry, generation, pre_commit)
        except OSError as exc:
            raise KeystoreError(f"the audit log in {self.folder} cannot be written ({exc.strerror or exc})",
                                path=self.folder) from None
        finally:
            self._lock.release()

    def _append_locked(self, entry: AuditEntry, generation: int | None, pre_commit: bool) -> None:
        segments = self.segments()
        path = segments[-1] if segments else self.folder / f"{SEGMENT_PREFIX}{1:06d}{SEGMENT_SUFFIX}"
        last = _GENESIS, 0
        if segments:
            last, size = self._tail(path)
            if size >= self.segment_bytes:
                match = _SEGMENT.fullmatch(path.name)
                assert match is not None  # segments() lists only names that match
                number = int(match.group(1)) + 1
                path = self.folder / f"{SEGMENT_PREFIX}{number:06d}{SEGMENT_SUFFIX}"
        prev, seq = last
        line = {**entry.to_json(), "seq": seq + 1, "gen": generation, "k": self.key_id, "prev": prev}
        if pre_commit:
            line["pre"] = True
        line["mac"] = self._mac(line)
        data = (json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsio.fsync_dir(self.folder)
            for old in self.segments()[:-self.keep_segments]:
                old.unlink(missing_ok=True)

    def _tail(self, path: Path) -> tuple[tuple[str, int], int]:
        """((MAC, seq) of the last complete line, size) of a segment; a torn last line is cut off."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - _TAIL_BYTES)
            os.lseek(fd, start, os.SEEK_SET)
            tail = b""
            while len(tail) < size - start:
                chunk = os.read(fd, size - start - len(tail))
                if not chunk:
                    break
                tail += chunk
            if tail and not tail.endswith(b"\n"):  # a crash mid-append: that entry never completed
                cut = tail.rfind(b"\n") + 1
                os.ftruncate(fd, start + cut)
                os.fsync(fd)
                size, tail = start + cut, tail[:cut]
        finally:
            os.close(fd)
        lines = tail.splitlines()
        for raw in reversed(lines):
            try:
                line = json.loads(raw)
                return (line["mac"], int(line["seq"])), size
            except (ValueError, KeyError, TypeError):
                continue
        return (_GENESIS, 0), size

    def _lines(self) -> Iterator[tuple[Path, int, str]]:
        for path in self.segments():
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:  # rotated away meanwhile
                continue
            for number, raw in enumerate(text.splitlines(), 1):
                if raw.strip():
                    yield path, number, raw

    def entries(self, *, limit: int | None = None) -> list[AuditEntry]:
        """The entries, oldest first (the last `limit` if given); unreadable lines are skipped."""
        found = []
        for _, _, raw in self._lines():
            try:
                line = json.loads(raw)
                found.append(AuditEntry(line["time"], line["actor"], line["action"], line["target"],
                                        line["outcome"], line["detail"]))
            except (ValueError, KeyError, TypeError):
                continue
        return found[-limit:] if limit else found

    def last_generation(self) -> tuple[int | None, bool]:
        """(keystore generation named by the newest entry, whether it was written before its commit)."""
        segments = self.segments()
        if not segments:
            return None, False
        with open(segments[-1], "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - _TAIL_BYTES))
            lines = handle.read().splitlines()
        for raw in reversed(lines):
            try:
                line = json.loads(raw)
                return line.get("gen"), bool(line.get("pre"))
            except ValueError:
                continue
        return None, False

    def verify(self) -> AuditReport:
        """Check every kept line's MAC and its link to the line before."""
        count, earlier, first_seq, seq = 0, 0, 0, 0
        prev: str | None = None  # the previous line's MAC; `seq` is its sequence number
        current_seen = False
        segments = self.segments()
        for path, number, raw in self._lines():
            where = f"{path.name} line {number}"
            try:
                line = json.loads(raw)
                mac, line_seq, line_prev = line["mac"], int(line["seq"]), line["prev"]
            except (ValueError, KeyError, TypeError):
                return AuditReport(False, count, len(segments), first_seq, f"{where} is not an audit entry")
            if prev is None:
                first_seq = line_seq
                if path == segments[0] and path.name.endswith(f"{1:06d}{SEGMENT_SUFFIX}") and line_seq == 1 \
                        and line_prev != _GENESIS:
                    return AuditReport(False, count, len(segments), first_seq, f"{where}: the chain does not start")
            elif line_prev != prev or line_seq != seq + 1:
                return AuditReport(False, count, len(segments), first_seq,
                                   f"{where}: the chain is broken (a line was removed, reordered or inserted)")
            if line.get("k") == self.key_id or current_seen:
                # once the current key has signed, every later line must be signed by it too
                if line.get("k") != self.key_id or not hmac.compare_digest(self._mac(line), mac):
                    return AuditReport(False, count, len(segments), first_seq,
                                       f"{where}: the MAC does not match (the line was changed or forged)")
                current_seen = True
            else:
                earlier += 1  # written under an earlier master key: only its place in the chain is checked
            prev, seq, count = mac, line_seq, count + 1
        return AuditReport(True, count, len(segments), first_seq, None, earlier)
