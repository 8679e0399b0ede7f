"""Where the master key comes from, the dev master.key fallback, and changing the master key."""

from __future__ import annotations

import base64
import json
import logging
import os

import pytest

from seglock.keystore import (
    Keystore,
    KeystoreExists,
    MasterKey,
    MasterKeyError,
    ScryptParams,
    WrongMasterKey,
)
from seglock.keystore.master import master_key_from_env

KEY_BYTES = bytes(range(32))
MASTER = base64.b64encode(KEY_BYTES).decode()
OTHER = base64.b64encode(bytes(range(100, 132))).decode()
FAST = ScryptParams(n=2**4, r=8, p=1)  # tests only: real keystores use the strong defaults


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def test_scrypt_defaults_are_strong():
    assert ScryptParams() == ScryptParams(n=2**15, r=8, p=1)


@pytest.mark.parametrize(("n", "r", "p"), [(3, 8, 1), (2**15, 0, 1), (2**15, 8, 17), (2**21, 8, 1)])
def test_bad_scrypt_parameters_are_refused(n, r, p):
    with pytest.raises(MasterKeyError, match="scrypt"):
        ScryptParams(n=n, r=r, p=p)


def test_first_start_without_settings_generates_a_0600_master_key_and_warns(home, caplog):
    with caplog.at_level(logging.WARNING, logger="seglock.keystore"):
        ks = Keystore.open(home, create=True, env={})
    assert mode(home / "master.key") == 0o600
    assert mode(ks.path) == 0o600
    assert len(base64.b64decode((home / "master.key").read_text())) == 32
    warnings = [r for r in caplog.records if r.name == "seglock.keystore" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "production" in warnings[0].getMessage()


def test_dev_master_key_opens_the_keystore_on_the_next_start(home):
    record, _ = Keystore.open(home, create=True, env={}).create_token("a", ["admin"])
    assert Keystore.open(home, env={}).get_token(record.id) == record


def test_lock_file_is_0600(home):
    Keystore.open(home, create=True, env={"SEGLOCK_MASTER_KEY": MASTER}).create_token("a", ["admin"])
    assert mode(home / "keystore.json.lock") == 0o600


@pytest.mark.parametrize("variable", ["KEY", "KEY_FILE", "PASSPHRASE", "PASSPHRASE_FILE"])
def test_no_master_key_file_is_written_when_the_environment_names_a_source(home, tmp_path, variable):
    secret_file = tmp_path / "secret"
    secret_file.write_text(MASTER if variable.startswith("KEY") else "correct horse battery")
    value = {"KEY": MASTER, "PASSPHRASE": "correct horse battery"}.get(variable, str(secret_file))
    Keystore.open(home, create=True, env={f"SEGLOCK_MASTER_{variable}": value}, scrypt=FAST)
    assert not (home / "master.key").exists()


def test_master_key_file_variable_opens_what_the_key_variable_made(home, tmp_path):
    record, _ = Keystore.open(home, create=True, env={"SEGLOCK_MASTER_KEY": MASTER}).create_token("a", ["admin"])
    secret_file = tmp_path / "master-key-secret"
    secret_file.write_text(MASTER + "\n")
    assert Keystore.open(home, env={"SEGLOCK_MASTER_KEY_FILE": str(secret_file)}).get_token(record.id) == record


def test_passphrase_file_with_a_trailing_newline_equals_the_passphrase(home, tmp_path):
    record, _ = Keystore.open(
        home, create=True, env={"SEGLOCK_MASTER_PASSPHRASE": "correct horse"}, scrypt=FAST
    ).create_token("a", ["admin"])
    secret_file = tmp_path / "passphrase"
    secret_file.write_text("correct horse\n")
    assert Keystore.open(home, env={"SEGLOCK_MASTER_PASSPHRASE_FILE": str(secret_file)}).get_token(record.id) == record


def test_passphrase_keystore_stores_its_scrypt_salt_and_parameters(home):
    ks = Keystore.open(home, create=True, env={"SEGLOCK_MASTER_PASSPHRASE": "pw"}, scrypt=FAST)
    kdf = json.loads(ks.path.read_bytes())["kdf"]
    assert (kdf["name"], kdf["n"], kdf["r"], kdf["p"]) == ("scrypt", 16, 8, 1)
    assert len(base64.b64decode(kdf["salt"])) == 16


def test_wrong_passphrase_is_refused(home):
    Keystore.open(home, create=True, env={"SEGLOCK_MASTER_PASSPHRASE": "right"}, scrypt=FAST)
    with pytest.raises(WrongMasterKey, match="SEGLOCK_MASTER_PASSPHRASE"):
        Keystore.open(home, env={"SEGLOCK_MASTER_PASSPHRASE": "wrong"})


def test_raw_key_for_a_passphrase_keystore_says_which_variable_to_set(home):
    Keystore.open(home, create=True, env={"SEGLOCK_MASTER_PASSPHRASE": "pw"}, scrypt=FAST)
    with pytest.raises(WrongMasterKey, match="set SEGLOCK_MASTER_PASSPHRASE"):
        Keystore.open(home, env={"SEGLOCK_MASTER_KEY": MASTER})


def test_key_variable_wins_over_passphrase_variable():
    key = master_key_from_env({"SEGLOCK_MASTER_KEY": MASTER, "SEGLOCK_MASTER_PASSPHRASE": "pw"})
    assert (key.kind, key.origin) == ("raw", "SEGLOCK_MASTER_KEY")


def test_url_safe_base64_key_is_accepted():
    key = master_key_from_env({"SEGLOCK_MASTER_KEY": base64.urlsafe_b64encode(bytes([251] * 32)).decode()})
    assert key.kind == "raw"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SEGLOCK_MASTER_KEY": "not base64 at all!"}, "not base64"),
        ({"SEGLOCK_MASTER_KEY": base64.b64encode(bytes(16)).decode()}, "got 16 bytes"),
        ({"SEGLOCK_MASTER_KEY": ""}, "set but empty"),
        ({"SEGLOCK_MASTER_KEY": MASTER, "SEGLOCK_MASTER_KEY_FILE": "/x"}, "set only one"),
        ({"SEGLOCK_MASTER_PASSPHRASE": "a", "SEGLOCK_MASTER_PASSPHRASE_FILE": "/x"}, "set only one"),
        ({"SEGLOCK_MASTER_KEY_FILE": "/nonexistent/seglock-key"}, "cannot read"),
    ],
)
def test_malformed_master_key_settings_are_refused(env, message):
    with pytest.raises(MasterKeyError, match=message) as info:
        master_key_from_env(env)
    assert "not base64 at all" not in str(info.value)


def test_empty_key_variable_is_refused_rather_than_falling_back_to_a_dev_key(home):
    with pytest.raises(MasterKeyError, match="empty"):
        Keystore.open(home, create=True, env={"SEGLOCK_MASTER_KEY": ""})
    assert not (home / "master.key").exists() and not (home / "keystore.json").exists()


def test_existing_keystore_without_any_master_key_says_where_to_put_one(home):
    Keystore.open(home, create=True, env={"SEGLOCK_MASTER_KEY": MASTER})
    with pytest.raises(MasterKeyError, match="SEGLOCK_MASTER_KEY"):
        Keystore.open(home, env={})
    assert not (home / "master.key").exists()


def test_init_refuses_an_existing_keystore(home):
    env = {"SEGLOCK_MASTER_KEY": MASTER}
    Keystore.init(home, env=env)
    before = (home / "keystore.json").read_bytes()
    with pytest.raises(KeystoreExists, match="already exists"):
        Keystore.init(home, env=env)
    assert (home / "keystore.json").read_bytes() == before


def test_master_key_repr_hides_the_secret():
    key = MasterKey("raw", KEY_BYTES, "SEGLOCK_MASTER_KEY")
    text = repr(key) + str(key)
    assert MASTER not in text and KEY_BYTES.hex() not in text and repr(KEY_BYTES) not in text


def test_master_key_cannot_be_pickled():
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(MasterKey("raw", KEY_BYTES, "x"))


# -- changing the master key --------------------------------------------------------------------


def test_change_to_a_new_raw_key_keeps_everything_and_refuses_the_old_key(home):
    ks = Keystore.open(home, create=True, env={"SEGLOCK_MASTER_KEY": MASTER})
    record, token = ks.create_token("a", ["segment"], ["m"])
    ks.add_model_key("m", "cp", {"perm": [1, 0]})
    ks.change_master_key(MasterKey.from_base64(OTHER, "new"))
    with pytest.raises(WrongMasterKey):
        Keystore.open(home, env={"SEGLOCK_MASTER_KEY": MASTER})
    reopened = Keystore.open(home, env={"SEGLOCK_MASTER_KEY": OTHER})
    assert reopened.verify_token(token, model="m").token_id == record.id
    assert reopened.active_model_key("m").material == {"perm": [1, 0]}
    assert ks.create_token("after", ["admin"])[0].name == "after"  # the old handle writes under the new key


def test_change_from_raw_key_to_passphrase(home):
    ks = Keystore.open(home, create=True, env={"SEGLOCK_MASTER_KEY": MASTER})
    ks.change_master_key(MasterKey.from_passphrase("a long passphrase", "new"), scrypt=FAST)
    assert json.loads(ks.path.read_bytes())["kdf"]["name"] == "scrypt"
    assert Keystore.open(home, env={"SEGLOCK_MASTER_PASSPHRASE": "a long passphrase"}).generation == ks.generation


def test_change_is_audited_without_the_key(home):
    ks = Keystore.open(home, create=True, env={"SEGLOCK_MASTER_KEY": MASTER})
    ks.change_master_key(MasterKey.from_base64(OTHER, "SEGLOCK_NEW_MASTER_KEY"), actor="cli")
    entry = ks.audit_log()[-1]
    assert (entry.action, entry.actor, entry.detail) == (
        "keystore.change_master_key", "cli", "from SEGLOCK_MASTER_KEY to SEGLOCK_NEW_MASTER_KEY"
    )


def test_dev_keystore_gets_a_generated_key_in_its_master_key_file(home):
    ks = Keystore.open(home, create=True, env={})
    old = (home / "master.key").read_text()
    ks.change_master_key()
    assert (home / "master.key").read_text() != old
    assert mode(home / "master.key") == 0o600
    assert not (home / "master.key.new").exists()
    assert Keystore.open(home, env={}).generation == ks.generation


def test_keystore_from_the_environment_needs_the_new_key_given(home):
    ks = Keystore.open(home, create=True, env={"SEGLOCK_MASTER_KEY": MASTER})
    with pytest.raises(MasterKeyError, match="SEGLOCK_NEW_MASTER_KEY"):
        ks.change_master_key()


def test_open_finishes_a_generated_key_change_cut_off_before_the_rename(home):
    ks = Keystore.open(home, create=True, env={})
    ks.create_token("a", ["admin"])
    new = MasterKey.generate()
    # The state a crash leaves between the keystore write and the rename of master.key.new:
    (home / "master.key.new").write_text(new.to_base64() + "\n")
    ks.change_master_key(new)
    reopened = Keystore.open(home, env={})
    assert (home / "master.key").read_text() == new.to_base64() + "\n"
    assert not (home / "master.key.new").exists()
    assert [r.name for r in reopened.list_tokens()] == ["a"]


def test_open_ignores_a_generated_key_whose_change_never_reached_the_keystore(home):
    Keystore.open(home, create=True, env={})
    old = (home / "master.key").read_text()
    (home / "master.key.new").write_text(MasterKey.generate().to_base64() + "\n")
    Keystore.open(home, env={})
    assert (home / "master.key").read_text() == old
