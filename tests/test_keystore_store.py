"""Keystore records: tokens, grants, expiry, model keys and rotation, transactions, audit.

Every test runs against both backends: the file in a home, and a PostgreSQL database.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
import time

import pytest
from pg_fixtures import needs_postgres, pg_server, pg_url  # noqa: F401 (fixtures)

from seglock.keystore import (
    Grant,
    InvalidRecord,
    KeyStateError,
    Keystore,
    ModelKeyNotFound,
    TokenNotFound,
)
from seglock.keystore.audit import AuditEntry

MASTER = base64.b64encode(bytes(range(32))).decode()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


_OPENED: list[Keystore] = []


@pytest.fixture(params=["file", pytest.param("postgres", marks=needs_postgres)])
def backend(request):
    return request.param


@pytest.fixture
def env(backend, request):
    env = {"SEGLOCK_MASTER_KEY": MASTER}
    if backend == "postgres":
        env["SEGLOCK_KEYSTORE_URL"] = request.getfixturevalue("pg_url")
    return env


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ks(tmp_path, env, clock):
    yield track(Keystore.open(tmp_path / "home", create=True, env=env, clock=clock))
    while _OPENED:
        _OPENED.pop().close()


def track(store: Keystore) -> Keystore:
    _OPENED.append(store)
    return store


def reopen(ks: Keystore, env, clock=None) -> Keystore:
    return track(Keystore.open(ks.home, env=env, clock=clock))


def stored_bytes(ks: Keystore) -> bytes:
    """The sealed envelope as the backend holds it (the file's bytes, or the database row)."""
    snapshot = ks.storage.load()
    ks.storage.release(snapshot)
    return snapshot.data


CP_MATERIAL = {"format": "seglock-cp-key", "version": 1, "perm": [3, 0, 2, 1, 5, 4]}
FFX_MATERIAL = {
    "format": "seglock-block-key", "version": 1, "method": "ffx", "block_size": 4,
    "permutation": list(range(48))[::-1], "password": "ffx-password-for-tests",
}


# -- tokens ---------------------------------------------------------------------------------


def test_token_string_is_prefix_id_and_256_bit_hex_secret(ks):
    record, token = ks.create_token("alice", ["segment"], ["m1"])
    match = re.fullmatch(r"slk_([0-9a-f]{12})_([0-9a-f]{64})", token)
    assert match is not None
    assert match.group(1) == record.id
    assert record.secret_hash == hashlib.sha256(match.group(2).encode()).digest()


def test_token_record_round_trips_through_the_file(ks, env, clock):
    clock.now = 1_700_000_123.5
    record, _ = ks.create_token("alice", ["admin", "segment"], ["m2", "m1"], expires_at=1_800_000_000.0, actor="t0")
    loaded = reopen(ks, env).get_token(record.id)
    assert loaded == record
    assert loaded.secret_hash == record.secret_hash
    assert (loaded.scopes, loaded.models) == (("segment", "admin"), ("m1", "m2"))
    assert (loaded.created_at, loaded.expires_at, loaded.created_by) == (1_700_000_123.5, 1_800_000_000.0, "t0")


def test_verify_returns_the_grant_of_a_valid_token(ks):
    record, token = ks.create_token("alice", ["segment"], ["m1"])
    expected = Grant(record.id, "alice", frozenset({"segment"}), frozenset({"m1"}), None)
    assert ks.verify_token(token, model="m1") == expected


def test_verify_without_model_checks_only_the_scope(ks):
    _, token = ks.create_token("alice", ["segment"], ["m1"])
    assert ks.verify_token(token) is not None


def test_wrong_secret_is_refused_as_401(ks):
    _, token = ks.create_token("alice", ["segment"], ["m1"])
    forged = token[:-1] + ("0" if token[-1] != "0" else "1")
    check = ks.check_token(forged, model="m1")
    assert (check.ok, check.reason, check.status, check.grant) == (False, "bad_secret", 401, None)
    assert ks.verify_token(forged, model="m1") is None


def test_unknown_id_is_refused_as_401(ks):
    check = ks.check_token("slk_0123456789ab_" + "0" * 64, model="m1")
    assert (check.ok, check.reason, check.status) == (False, "unknown", 401)


@pytest.mark.parametrize(
    "token",
    ["", "slk_", "Bearer slk_0123456789ab_" + "0" * 64, "slk_0123456789ab_" + "0" * 63, "slk_0123456789AB_" + "0" * 64,
     "slk_0123456789ab_" + "0" * 64 + "\n", None, 42],
)
def test_malformed_token_is_refused_as_401(ks, token):
    check = ks.check_token(token)
    assert (check.ok, check.reason, check.status) == (False, "malformed", 401)


def test_missing_scope_is_403_with_the_grant(ks):
    record, token = ks.create_token("ops", ["admin"])
    check = ks.check_token(token, scope="segment")
    assert (check.ok, check.reason, check.status) == (False, "scope", 403)
    assert check.grant.token_id == record.id
    assert ks.verify_token(token, scope="segment") is None
    assert ks.verify_token(token, scope="admin") is not None


def test_model_not_granted_is_403(ks):
    _, token = ks.create_token("alice", ["segment"], ["m1"])
    check = ks.check_token(token, model="m2")
    assert (check.ok, check.reason, check.status) == (False, "model", 403)


def test_star_grants_every_model(ks):
    _, token = ks.create_token("all", ["segment"], ["*"])
    grant = ks.verify_token(token, model="anything")
    assert grant is not None and grant.all_models and grant.allows_model("other")


def test_token_expires_at_its_expiry_time(ks, clock):
    _, token = ks.create_token("temp", ["segment"], ["m1"], expires_at=clock.now + 60)
    clock.now += 59.999
    assert ks.check_token(token, model="m1").ok
    clock.now += 0.001
    check = ks.check_token(token, model="m1")
    assert (check.ok, check.reason, check.status) == (False, "expired", 401)


def test_expiry_in_the_past_is_refused(ks, clock):
    with pytest.raises(InvalidRecord, match="not in the future"):
        ks.create_token("temp", ["segment"], ["m1"], expires_at=clock.now)


def test_revoked_token_is_refused_as_401(ks):
    record, token = ks.create_token("alice", ["segment"], ["m1"])
    ks.revoke_token(record.id)
    check = ks.check_token(token, model="m1")
    assert (check.ok, check.reason, check.status) == (False, "revoked", 401)


def first_true(condition, backend: str) -> float:
    """Seconds until `condition()` holds: at once for the file (one stat sees the change), within
    1 s for the database (LISTEN/NOTIFY brings the news)."""
    started = time.monotonic()
    while not condition():
        waited = time.monotonic() - started
        assert backend == "postgres" and waited < 1.0, f"not seen after {waited:.3f} s"
        time.sleep(0.005)
    return time.monotonic() - started


def test_revocation_in_another_instance_takes_effect_on_the_next_check(ks, env, backend):
    record, token = ks.create_token("alice", ["segment"], ["m1"])
    server = reopen(ks, env)
    assert server.verify_token(token, model="m1") is not None
    ks.revoke_token(record.id)
    first_true(lambda: server.verify_token(token, model="m1") is None, backend)


def test_refresh_reloads_only_after_a_change(ks, env, backend):
    server = reopen(ks, env)
    assert server.refresh() is False
    ks.create_token("alice", ["segment"], ["m1"])
    first_true(server.refresh, backend)
    assert server.refresh() is False


def test_changed_says_whether_refresh_would_reload_without_reloading(ks, env, backend):
    server = reopen(ks, env)
    assert server.changed() is False
    ks.create_token("alice", ["segment"], ["m1"])
    first_true(server.changed, backend)
    assert server.changed() is True  # asking again reads nothing: the reload is still to come
    assert server.refresh() is True
    assert server.changed() is False
    assert [r.name for r in server.list_tokens()] == ["alice"]


def test_revoke_is_idempotent_and_writes_once(ks):
    record, _ = ks.create_token("alice", ["segment"], ["m1"])
    first = ks.revoke_token(record.id)
    generation = ks.generation
    assert ks.revoke_token(record.id) == first
    assert ks.generation == generation


def test_revoke_unknown_id_raises_token_not_found(ks):
    with pytest.raises(TokenNotFound, match="0123456789ab"):
        ks.revoke_token("0123456789ab")


def test_list_tokens_shows_every_token_oldest_first(ks, clock):
    first, _ = ks.create_token("a", ["segment"], ["m1"])
    clock.now += 1
    second, _ = ks.create_token("b", ["admin"])
    ks.revoke_token(first.id)
    assert [(r.id, r.revoked) for r in ks.list_tokens()] == [(first.id, True), (second.id, False)]


def test_token_status_names_active_revoked_expired(ks, clock):
    record, _ = ks.create_token("a", ["segment"], ["m1"], expires_at=clock.now + 10)
    assert record.status(clock.now) == "active"
    assert record.status(clock.now + 10) == "expired"
    assert ks.revoke_token(record.id).status(clock.now) == "revoked"


@pytest.mark.parametrize(
    ("scopes", "models", "message"),
    [
        (["root"], ["m1"], "unknown scope 'root'"),
        ([], ["m1"], "at least one scope"),
        (["segment"], [], "needs at least one model"),
        (["segment"], ["*", "m1"], "cannot be listed with names"),
        (["segment"], [""], "model name"),
    ],
)
def test_malformed_token_requests_are_refused(ks, scopes, models, message):
    with pytest.raises(InvalidRecord, match=re.escape(message)):
        ks.create_token("x", scopes, models)


def test_empty_token_name_is_refused(ks):
    with pytest.raises(InvalidRecord, match="non-empty"):
        ks.create_token("  ", ["admin"])


def test_check_with_unknown_scope_is_a_programming_error(ks):
    with pytest.raises(InvalidRecord, match="unknown scope"):
        ks.check_token("slk_0123456789ab_" + "0" * 64, scope="write")


# -- model keys -----------------------------------------------------------------------------


def test_cp_key_round_trips_with_its_material(ks, env):
    added = ks.add_model_key("seg", "cp", CP_MATERIAL, actor="t1")
    loaded = reopen(ks, env).get_model_key("seg", 1)
    assert loaded == added
    assert loaded.material == CP_MATERIAL
    assert (loaded.kind, loaded.state, loaded.version, loaded.created_by) == ("cp", "active", 1, "t1")


def test_block_key_round_trips_with_method_block_size_and_password(ks, env):
    ks.add_model_key("blk", "block", FFX_MATERIAL)
    active = reopen(ks, env).active_model_key("blk")
    assert active.material == FFX_MATERIAL


@pytest.mark.parametrize(
    ("kind", "material", "message"),
    [
        ("rsa", {"x": 1}, "unknown key kind"),
        ("cp", {"perm": [0, 0, 1]}, "permutation"),
        ("cp", {}, "non-empty dict"),
        ("block", {"method": "rot13", "block_size": 4}, "method"),
        ("block", {"method": "shf", "block_size": 0}, "block_size"),
        ("block", {"method": "ffx", "block_size": 4}, "password"),
        ("cp", {"perm": [1, 0], "extra": object()}, "JSON-serialisable"),
    ],
)
def test_malformed_key_material_is_refused(ks, kind, material, message):
    with pytest.raises(InvalidRecord, match=message):
        ks.add_model_key("m", kind, material)


def test_active_model_key_is_none_for_a_model_without_keys(ks):
    assert ks.active_model_key("nope") is None


def test_get_model_key_of_unknown_version_raises(ks):
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    with pytest.raises(ModelKeyNotFound, match="no key version 2"):
        ks.get_model_key("seg", 2)


def test_returned_material_is_a_private_copy(ks):
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    ks.active_model_key("seg").material["perm"][0] = 99
    assert ks.active_model_key("seg").material == CP_MATERIAL


def test_rotation_steps_are_one_write_each_and_end_with_the_old_key_destroyed(ks):
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    start = ks.generation
    new = ks.add_model_key("seg", "cp", {"perm": [1, 0, 3, 2, 5, 4]}, activate=False)
    assert (new.state, ks.active_model_key("seg").version, ks.generation) == ("pending", 1, start + 1)
    ks.set_active("seg", 2)
    assert [v.state for v in ks.model_key_versions("seg")] == ["retiring", "active"]
    assert ks.generation == start + 2
    destroyed = ks.destroy_model_key("seg", 1)
    assert (destroyed.state, destroyed.material, ks.generation) == ("destroyed", None, start + 3)
    assert ks.get_model_key("seg", 1).material is None
    assert ks.active_model_key("seg").material == {"perm": [1, 0, 3, 2, 5, 4]}


def test_destroyed_material_is_gone_from_the_file(ks, env):
    ks.add_model_key("blk", "block", FFX_MATERIAL)
    ks.add_model_key("blk", "block", {**FFX_MATERIAL, "password": "second"})
    ks.destroy_model_key("blk", 1)
    assert reopen(ks, env).get_model_key("blk", 1).material is None


def test_destroying_the_active_key_is_refused(ks):
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    with pytest.raises(KeyStateError, match="is active"):
        ks.destroy_model_key("seg", 1)
    assert ks.active_model_key("seg").material == CP_MATERIAL


def test_activating_a_destroyed_key_is_refused(ks):
    ks.add_model_key("seg", "cp", CP_MATERIAL, activate=False)
    ks.destroy_model_key("seg", 1)
    with pytest.raises(KeyStateError, match="destroyed"):
        ks.set_active("seg", 1)


def test_version_numbers_are_never_reused(ks):
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    ks.destroy_model_key("seg", 1)
    assert ks.add_model_key("seg", "cp", CP_MATERIAL).version == 3
    assert len({v.id for v in ks.model_key_versions("seg")}) == 3


def test_retiring_key_can_be_activated_again(ks):
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    ks.set_active("seg", 1)
    assert [v.state for v in ks.model_key_versions("seg")] == ["active", "retiring"]


def test_models_lists_the_models_with_keys(ks):
    ks.add_model_key("b", "cp", CP_MATERIAL)
    ks.add_model_key("a", "block", FFX_MATERIAL)
    assert ks.models() == ["a", "b"]


# -- transactions ---------------------------------------------------------------------------


def test_a_transaction_is_one_write(ks):
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    ks.add_model_key("seg", "cp", CP_MATERIAL, activate=False)
    start = ks.generation
    with ks.transaction():
        ks.set_active("seg", 2)
        ks.destroy_model_key("seg", 1)
        ks.create_token("x", ["segment"], ["seg"])
    assert ks.generation == start + 1


def test_an_exception_in_a_transaction_writes_nothing(ks):
    ks.create_token("keep", ["admin"])
    before = stored_bytes(ks)
    with pytest.raises(RuntimeError):
        with ks.transaction():
            ks.create_token("lost", ["admin"])
            raise RuntimeError("abort")
    assert stored_bytes(ks) == before
    assert [r.name for r in ks.list_tokens()] == ["keep"]


def test_reads_inside_a_transaction_see_its_changes(ks):
    with ks.transaction():
        record, _ = ks.create_token("x", ["admin"])
        assert ks.get_token(record.id) == record


def test_a_write_removes_temp_files_a_killed_writer_left(ks, backend):
    if backend != "file":
        pytest.skip("temp files are the file backend's")
    stale = ks.home / ".keystore.json.abc123.tmp"
    stale.write_bytes(b"half a keystore")
    ks.create_token("x", ["admin"])
    assert not stale.exists()


def test_threads_sharing_one_instance_lose_no_writes(ks):
    def make(prefix):
        for i in range(20):
            ks.create_token(f"{prefix}{i}", ["admin"])

    threads = [threading.Thread(target=make, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ks.list_tokens()) == 80


def test_two_instances_in_one_process_lose_no_writes(ks, env):
    other = reopen(ks, env)
    ks.create_token("a", ["admin"])
    other.create_token("b", ["admin"])
    ks.create_token("c", ["admin"])
    assert sorted(r.name for r in reopen(ks, env).list_tokens()) == ["a", "b", "c"]


# -- audit ----------------------------------------------------------------------------------


def test_every_change_is_audited_with_its_actor(ks, clock):
    record, _ = ks.create_token("a", ["segment"], ["seg"], actor="admin1")
    ks.add_model_key("seg", "cp", CP_MATERIAL, activate=False, actor="admin1")
    ks.set_active("seg", 1, actor="admin1")
    ks.revoke_token(record.id, actor="admin2")
    log = [(e.actor, e.action, e.target, e.outcome) for e in ks.audit_log()]
    assert log == [
        ("system", "keystore.create", ks.location, "ok"),
        ("admin1", "token.create", record.id, "ok"),
        ("admin1", "model_key.add", "seg@v1", "ok"),
        ("admin1", "model_key.activate", "seg@v1", "ok"),
        ("admin2", "token.revoke", record.id, "ok"),
    ]
    assert {e.time for e in ks.audit_log()} == {clock.now}


def test_audit_entries_survive_reopening(ks, env, clock):
    ks.audit("admin.login", "console", "denied", actor="abc", detail="bad password")
    assert reopen(ks, env).audit_log(limit=1) == [
        AuditEntry(clock.now, "abc", "admin.login", "console", "denied", "bad password")
    ]


def test_audit_scrubs_a_token_that_slips_into_an_entry(ks):
    _, token = ks.create_token("a", ["admin"])
    entry = ks.audit("oops", token, "error", detail=f"header was Bearer {token}")
    secret = token.split("_")[2]
    assert secret not in entry.target and secret not in entry.detail
    assert entry.target == token.rsplit("_", 1)[0] + "_[redacted]"


def test_audit_outcome_must_be_known(ks):
    with pytest.raises(InvalidRecord, match="outcome"):
        ks.audit("x", outcome="maybe")


def test_a_rolled_back_transaction_leaves_no_audit_entry(ks):
    count = len(ks.audit_log())
    with pytest.raises(KeyStateError):
        with ks.transaction():
            ks.add_model_key("seg", "cp", CP_MATERIAL)
            ks.destroy_model_key("seg", 1)
    assert len(ks.audit_log()) == count


# -- reprs ----------------------------------------------------------------------------------


def test_reprs_show_no_secret_hash_or_material(ks):
    record, token = ks.create_token("a", ["segment"], ["seg"])
    version = ks.add_model_key("blk", "block", FFX_MATERIAL)
    texts = " ".join(repr(x) + str(x) for x in (record, version, ks, ks.verify_token(token, model="seg")))
    assert token.split("_")[2] not in texts
    assert record.secret_hash.hex() not in texts and repr(record.secret_hash) not in texts
    assert "ffx-password-for-tests" not in texts and "material" not in texts


def test_status_reports_counts_without_secrets(ks, clock, backend):
    ks.create_token("a", ["segment"], ["seg"], expires_at=clock.now + 1)
    ks.create_token("b", ["admin"])
    ks.add_model_key("seg", "cp", CP_MATERIAL)
    clock.now += 2
    status = ks.status()
    assert status["tokens"] == {"active": 1, "revoked": 0, "expired": 1}
    active_id = ks.active_model_key("seg").id
    assert status["models"] == {"seg": [{"version": 1, "id": active_id, "kind": "cp", "state": "active"}]}
    assert (status["kdf"], status["master_key_source"]) == ({"name": "none"}, "SEGLOCK_MASTER_KEY")
    if backend == "file":
        assert (status["backend"], status["file_mode"]) == ("file", "0o600")
    else:
        assert (status["backend"], status["schema_version"], status["row_version"]) == ("postgresql", 1, 4)
        assert status["envelope_bytes"] == len(stored_bytes(ks))


def test_keystore_file_is_0600(ks, backend):
    if backend != "file":
        pytest.skip("file modes are the file backend's")
    ks.create_token("a", ["admin"])
    assert os.stat(ks.path).st_mode & 0o777 == 0o600


def test_a_dump_of_the_store_holds_no_secret_in_the_clear(ks):
    record, token = ks.create_token("alice", ["segment"], ["seg"])
    ks.add_model_key("blk", "block", FFX_MATERIAL)
    dump = stored_bytes(ks)
    for secret in (token.split("_")[2], "ffx-password-for-tests", "alice", record.secret_hash.hex()):
        assert secret.encode() not in dump
    assert b'"cipher":"AES-256-GCM"' in dump
