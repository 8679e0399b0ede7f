"""The PostgreSQL keystore's own behaviour: schema init and migrations, moving a home's keystore
into a database, the URL settings, and what readers and writers do while the database is down."""

from __future__ import annotations

import base64
import time

import pytest

psycopg = pytest.importorskip("psycopg")

from pg_fixtures import PostgresServer, needs_postgres, pg_server, pg_url  # noqa: E402, F401 (fixtures)

from seglock.app.cli import main  # noqa: E402
from seglock.keystore import Keystore, KeystoreExists, KeystoreUnavailable, keystore_url  # noqa: E402
from seglock.keystore.postgres import MIGRATIONS, SCHEMA_VERSION, redacted  # noqa: E402
from seglock.keystore.storage import KeystoreURLError  # noqa: E402

pytestmark = needs_postgres

MASTER = base64.b64encode(bytes(range(32))).decode()
CP = {"format": "seglock-cp-key", "version": 1, "perm": [3, 0, 2, 1]}


@pytest.fixture
def master_env(monkeypatch):
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER)
    for name in ("SEGLOCK_KEYSTORE_URL", "SEGLOCK_KEYSTORE_URL_FILE"):
        monkeypatch.setenv(name, "")  # recorded, so what `--keystore` puts in the environment is undone
        monkeypatch.delenv(name)
    return {"SEGLOCK_MASTER_KEY": MASTER}


def schema_rows(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM seglock_schema ORDER BY version")]


def test_init_applies_the_schema_then_makes_the_keystore_and_again_leaves_it(pg_url, master_env, capsys):
    assert main(["keystore", "init", "--keystore", pg_url]) == 0
    first = capsys.readouterr().err
    assert f"at version {SCHEMA_VERSION} (applied migration 1)" in first and "made the keystore" in first
    assert schema_rows(pg_url) == list(range(1, len(MIGRATIONS) + 1))
    with Keystore.open(None, url=pg_url, env=master_env) as ks:
        generation = ks.generation
    assert main(["keystore", "init", "--keystore", pg_url]) == 0
    second = capsys.readouterr().err
    assert "(nothing to apply)" in second and "already exists" in second
    with Keystore.open(None, url=pg_url, env=master_env) as ks:
        assert ks.generation == generation


def test_status_names_the_database_without_its_password(pg_url, master_env, capsys):
    main(["keystore", "init", "--keystore", pg_url])
    capsys.readouterr()
    with_password = pg_url.replace("postgres@", "postgres:hunter2@")  # trust auth ignores it
    assert main(["keystore", "status", "--keystore", with_password]) == 0
    out = capsys.readouterr().out
    assert "schema version 1, row version 1" in out and "hunter2" not in out
    port = int(pg_url.split(":")[2].split("/")[0])
    assert redacted(with_password) == f"postgresql://postgres@127.0.0.1:{port}/postgres"


def test_open_without_init_says_to_run_init(pg_url, master_env):
    with pytest.raises(Exception, match="seglock keystore init --keystore URL"):
        Keystore.open(None, url=pg_url, env=master_env)


def test_migrate_moves_every_token_key_and_audit_entry(tmp_path, pg_url, master_env, capsys):
    home = tmp_path / "home"
    with Keystore.open(home, create=True, env=master_env) as source:
        tokens = [source.create_token(f"t{i}", ["segment"], ["seg"], actor="a")[1] for i in range(5)]
        revoked, _ = source.create_token("gone", ["admin"])
        source.revoke_token(revoked.id)
        source.add_model_key("seg", "cp", CP)
        source.add_model_key("seg", "cp", {**CP, "perm": [0, 1, 3, 2]})
        source.destroy_model_key("seg", 1)
        before_tokens, before_audit = source.list_tokens(), source.audit_log()
    file_bytes = (home / "keystore.json").read_bytes()
    assert main(["keystore", "migrate", "--from", str(home), "--to", pg_url]) == 0
    assert "6 tokens, 1 models' keys" in capsys.readouterr().err
    with Keystore.open(None, url=pg_url, env=master_env) as copy:
        assert copy.list_tokens() == before_tokens
        assert all(copy.verify_token(token, model="seg") is not None for token in tokens)
        assert copy.get_token(revoked.id).revoked
        assert copy.get_model_key("seg", 1).material is None
        assert copy.active_model_key("seg").material == {**CP, "perm": [0, 1, 3, 2]}
        assert copy.audit_log()[:-1] == before_audit
        assert copy.audit_log()[-1].action == "keystore.migrate"
    assert (home / "keystore.json").read_bytes() == file_bytes  # the file is left as it is


def test_migrate_refuses_a_database_that_holds_a_keystore(tmp_path, pg_url, master_env, capsys):
    Keystore.open(tmp_path / "home", create=True, env=master_env).close()
    Keystore.open(None, create=True, url=pg_url, env=master_env).close()
    assert main(["keystore", "migrate", "--from", str(tmp_path / "home"), "--to", pg_url]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(KeystoreExists):
        with Keystore.open(tmp_path / "home", env=master_env) as source:
            source.copy_to(pg_url)


def test_url_comes_from_the_variable_or_the_file_it_names(tmp_path):
    path = tmp_path / "url"
    path.write_text("postgresql://u:secret@db/seglock\n")
    assert keystore_url({"SEGLOCK_KEYSTORE_URL_FILE": str(path)}) == "postgresql://u:secret@db/seglock"
    assert keystore_url({"SEGLOCK_KEYSTORE_URL": "postgresql://db/x"}) == "postgresql://db/x"
    assert keystore_url({}) is None
    with pytest.raises(KeystoreURLError, match="set only one"):
        keystore_url({"SEGLOCK_KEYSTORE_URL": "a", "SEGLOCK_KEYSTORE_URL_FILE": str(path)})
    with pytest.raises(KeystoreURLError, match="cannot read it"):
        keystore_url({"SEGLOCK_KEYSTORE_URL_FILE": str(tmp_path / "missing")})


def test_keystores_in_two_schemas_of_one_database_stay_apart(pg_server, master_env):
    """Two keystores in two schemas of one database: writes and notifications stay apart."""
    first, second = pg_server.create_schema(), pg_server.create_schema()
    a = Keystore.open(None, create=True, url=first, env=master_env)
    b = Keystore.open(None, create=True, url=second, env=master_env)
    try:
        record, token = a.create_token("only-in-a", ["segment"], ["m"])
        assert b.list_tokens() == [] and a.verify_token(token, model="m") is not None
        b.refresh()
        for _ in range(5):
            a.create_token("more", ["admin"])
        time.sleep(0.2)
        assert b.refresh() is False  # a's notifications name a's schema
    finally:
        a.close()
        b.close()


@pytest.mark.slow  # a server of its own, killed and restarted: .ci/scale.sh runs it
def test_database_down_reads_go_on_for_the_bound_writes_fail_then_all_resumes(tmp_path, monkeypatch):
    server = PostgresServer(durable=True)  # a crash loses no committed write
    server.start()
    # The bound is wide enough that a slow kill on a loaded CI host (2 s once) stays inside it.
    env = {"SEGLOCK_MASTER_KEY": MASTER, "SEGLOCK_KEYSTORE_MAX_STALE_S": "5"}
    try:
        ks = Keystore.open(None, create=True, url=server.url(), env=env)
        record, token = ks.create_token("alice", ["segment"], ["m"])
        ks.refresh()
        killing = time.monotonic()
        server.kill()
        down = time.monotonic()
        assert down - killing < 4, f"the kill took {down - killing:.1f} s"
        assert ks.verify_token(token, model="m") is not None  # the last good state, from memory
        started = time.monotonic()
        with pytest.raises(KeystoreUnavailable, match="cannot be used right now"):
            ks.create_token("bob", ["segment"], ["m"])
        assert time.monotonic() - started < 8  # refused promptly, not after the 30 s lock timeout
        while time.monotonic() - down < 5.5:
            time.sleep(0.1)
        with pytest.raises(KeystoreUnavailable, match="no contact with the database"):
            ks.verify_token(token, model="m")
        server.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                made, _ = ks.create_token("carol", ["segment"], ["m"])
                break
            except KeystoreUnavailable:
                assert time.monotonic() < deadline, "the keystore did not come back by itself"
                time.sleep(0.2)
        assert ks.verify_token(token, model="m") is not None
        assert [r.name for r in ks.list_tokens()] == ["alice", "carol"]
        ks.close()
    finally:
        server.destroy()


def test_a_restore_from_backup_is_followed_even_though_the_version_goes_back(pg_url, master_env):
    with Keystore.open(None, create=True, url=pg_url, env=master_env) as ks:
        with psycopg.connect(pg_url) as conn:  # the backup: what pg_dump would hold of the row
            backup = conn.execute("SELECT version, envelope FROM seglock_keystore").fetchone()
        server = Keystore.open(None, url=pg_url, env=master_env)
        try:
            record, token = ks.create_token("after-backup", ["segment"], ["m"])
            deadline = time.monotonic() + 1
            while server.verify_token(token, model="m") is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with psycopg.connect(pg_url) as conn:  # the restore
                conn.execute("UPDATE seglock_keystore SET version = %s, envelope = %s", backup)
            deadline = time.monotonic() + 2
            while server.verify_token(token, model="m") is not None:
                assert time.monotonic() < deadline, "the server still serves the state from before the restore"
                time.sleep(0.01)
            assert server.list_tokens() == []
        finally:
            server.close()


def test_a_database_keystore_keeps_its_audit_in_the_envelope_capped_to_the_newest(pg_url, master_env, monkeypatch):
    from seglock.keystore import store

    monkeypatch.setattr(store, "DB_AUDIT_KEEP", 5)
    with Keystore.open(None, create=True, url=pg_url, env=master_env) as ks:
        for n in range(8):
            ks.audit("client-key", f"m{n}", "ok", actor="t")
        entries = ks.audit_log()
        assert [e.target for e in entries] == ["m3", "m4", "m5", "m6", "m7"]  # the newest five, oldest first
        report = ks.verify_audit()
        assert (report.ok, report.entries) == (True, 5)
        # a change and its entry are one write: the token and its token.create entry arrive together
        record, _ = ks.create_token("capped", ["segment"], ["m"])
        assert ks.audit_log()[-1].action == "token.create" and ks.audit_log()[-1].target == record.id
        assert len(ks.audit_log()) == 5
