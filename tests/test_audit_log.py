"""The audit log: append-only HMAC-chained segment files beside keystore.json, O(1) per entry."""

from __future__ import annotations

import base64
import json
import os

import pytest

from seglock.keystore import Keystore, KeystoreError
from seglock.keystore.audit import AuditLog, make_entry
from seglock.keystore.errors import KeystoreRolledBack

MASTER = base64.b64encode(bytes(range(32))).decode()
ENV = {"SEGLOCK_MASTER_KEY": MASTER}


@pytest.fixture
def ks(tmp_path):
    return Keystore.open(tmp_path / "home", create=True, env=ENV)


def segment_files(home):
    return sorted(p for p in home.iterdir() if p.name.startswith("keystore.audit-"))


def test_audit_entries_do_not_grow_the_sealed_keystore(ks):
    before = ks.path.stat().st_size
    for i in range(200):
        ks.audit("client-key", f"m{i}", actor="abcdef012345")
    assert ks.path.stat().st_size == before
    assert [e.target for e in ks.audit_log(limit=2)] == ["m198", "m199"]


def test_audit_entries_are_lines_of_an_hmac_chain_in_segment_files(ks):
    ks.audit("x", "t1")
    ks.audit("x", "t2")
    lines = [json.loads(line) for f in segment_files(ks.home) for line in f.read_text().splitlines()]
    assert [line["target"] for line in lines][-2:] == ["t1", "t2"]
    assert lines[-1]["prev"] == lines[-2]["mac"] and len(lines[-1]["mac"]) == 64
    assert oct(segment_files(ks.home)[0].stat().st_mode & 0o777) == "0o600"
    report = ks.verify_audit()
    assert report.ok and report.entries == len(lines) and report.problem is None


def test_an_edited_audit_line_is_detected(ks):
    ks.audit("x", "t1", actor="alice")
    ks.audit("x", "t2", actor="alice")
    path = segment_files(ks.home)[-1]
    path.write_text(path.read_text().replace('"alice"', '"mallory"', 1))
    report = ks.verify_audit()
    assert not report.ok and "MAC" in report.problem


def test_a_deleted_audit_line_is_detected(ks):
    for i in range(3):
        ks.audit("x", f"t{i}")
    path = segment_files(ks.home)[-1]
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2] + lines[-1:]))
    report = ks.verify_audit()
    assert not report.ok and "chain" in report.problem


def test_a_forged_line_without_the_master_key_is_detected(ks, tmp_path):
    ks.audit("x", "t1")
    other = AuditLog(ks.home, b"\x01" * 32)  # someone with the folder but another key
    other.append(make_entry(1.0, "mallory", "token.create", "x", "ok", None))
    assert not ks.verify_audit().ok


def test_segments_rotate_and_old_ones_are_dropped(tmp_path):
    log = AuditLog(tmp_path, b"\x02" * 32, segment_bytes=2_000, keep_segments=3)
    for i in range(100):
        log.append(make_entry(float(i), "a", "tick", str(i), "ok", None))
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("keystore.audit-"))
    assert len(files) == 3 and files[-1] > files[0]
    assert sum(f.stat().st_size for f in tmp_path.iterdir() if f.name in files) < 3 * 2_000 + 3 * 400
    assert [e.target for e in log.entries(limit=1)] == ["99"]
    report = log.verify()
    assert report.ok and report.first_seq > 1  # the chain is checked from the oldest segment kept


def test_an_append_reads_only_the_tail_of_the_current_segment(tmp_path, monkeypatch):
    log = AuditLog(tmp_path, b"\x03" * 32, segment_bytes=10_000_000)
    for i in range(300):
        log.append(make_entry(float(i), "a", "tick", str(i), "ok", None))
    assert log.segments()[0].stat().st_size > 50_000
    read = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
    log.append(make_entry(1.0, "a", "tick", "last", "ok", None))
    assert sum(read) <= 16_384  # O(1): the last entry, not the 300 before it


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path):
    log = AuditLog(tmp_path, b"\x04" * 32)
    log.append(make_entry(1.0, "a", "tick", "1", "ok", None))
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("keystore.audit-"))
    with open(path, "a") as handle:
        handle.write('{"time":2.0,"act')  # a crash mid-write
    log.append(make_entry(3.0, "a", "tick", "3", "ok", None))
    assert [e.target for e in log.entries()] == ["1", "3"] and log.verify().ok


def test_changes_are_audited_before_they_are_committed(ks, monkeypatch):
    """A change whose audit record cannot be written is not made."""
    monkeypatch.setattr(AuditLog, "append", lambda self, entry, **kw: (_ for _ in ()).throw(
        KeystoreError("audit log unavailable")))
    with pytest.raises(KeystoreError):
        ks.create_token("a", ["segment"], ["m"])
    assert ks.list_tokens() == []


def test_an_older_authentic_keystore_file_is_refused_by_a_running_keystore(ks):
    old = ks.path.read_bytes()
    ks.create_token("a", ["segment"], ["m"])
    ks.path.write_bytes(old)  # restore of an older, authentic copy behind the server's back
    with pytest.raises(KeystoreRolledBack):
        ks.list_tokens()


def test_an_older_authentic_keystore_file_is_refused_on_open_unless_allowed(ks):
    old = ks.path.read_bytes()
    ks.create_token("a", ["segment"], ["m"])
    ks.create_token("b", ["segment"], ["m"])
    ks.path.write_bytes(old)
    with pytest.raises(KeystoreRolledBack, match="SEGLOCK_KEYSTORE_ALLOW_ROLLBACK"):
        Keystore.open(ks.home, env=ENV)
    restored = Keystore.open(ks.home, env={**ENV, "SEGLOCK_KEYSTORE_ALLOW_ROLLBACK": "1"})
    assert restored.list_tokens() == []
    assert restored.audit_log(limit=1)[0].action == "keystore.rollback"
    Keystore.open(ks.home, env=ENV)  # accepted once: the audit log now knows this generation


def test_the_cli_verifies_the_chain_and_fails_on_a_broken_one(ks, capsys, monkeypatch):
    from seglock.app.cli import main

    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER)
    ks.audit("x", "t1", actor="alice")
    assert main(["keystore", "audit", "--verify", "--home", str(ks.home)]) == 0
    assert "audit log intact: 2 entries" in capsys.readouterr().out
    path = segment_files(ks.home)[-1]
    path.write_text(path.read_text().replace('"alice"', '"bob"'))
    assert main(["keystore", "audit", "--verify", "--home", str(ks.home)]) == 1
    assert "MAC does not match" in capsys.readouterr().err
