"""`seglock tokens ...` and `seglock keystore ...`: output, exit codes (0 ok, 2 user error, 1 else)."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

import pytest

from seglock.app.cli import main
from seglock.keystore import Keystore

MASTER = base64.b64encode(bytes(range(32))).decode()
OTHER = base64.b64encode(bytes(range(50, 82))).decode()
TOKEN = re.compile(r"slk_([0-9a-f]{12})_[0-9a-f]{64}")
MASTER_VARIABLES = [f"SEGLOCK_{n}_{s}" for n in ("MASTER", "NEW_MASTER")
                    for s in ("KEY", "KEY_FILE", "PASSPHRASE", "PASSPHRASE_FILE")]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in MASTER_VARIABLES + ["SEGLOCK_HOME"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER)


@pytest.fixture
def home(tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["keystore", "init", "--home", str(home)]) == 0
    capsys.readouterr()
    return home


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def create(capsys, home, *extra: str) -> str:
    code, out, _ = run(capsys, "tokens", "create", "--home", str(home), "--name", "n", *extra)
    assert code == 0
    return out.strip()


def test_create_prints_only_the_token_on_stdout(capsys, home):
    code, out, err = run(capsys, "tokens", "create", "--home", str(home), "--name", "web", "--scope", "segment",
                         "--model", "m1")
    assert code == 0
    assert TOKEN.fullmatch(out.strip())
    assert "not shown again" in err and len(err.strip().splitlines()) == 1
    assert Keystore.open(home).verify_token(out.strip(), model="m1") is not None


def test_created_token_has_the_scopes_and_models_asked_for(capsys, home):
    token = create(capsys, home, "--scope", "segment", "--scope", "admin", "--model", "a", "--model", "b")
    grant = Keystore.open(home).verify_token(token, scope="admin")
    assert (grant.scopes, grant.models) == (frozenset({"segment", "admin"}), frozenset({"a", "b"}))


def test_create_json_holds_id_and_token(capsys, home):
    data = json.loads(create(capsys, home, "--scope", "admin", "--json"))
    assert TOKEN.fullmatch(data["token"]).group(1) == data["id"]
    assert (data["scopes"], data["models"], data["created_by"]) == (["admin"], [], "cli")


def test_expires_sets_the_expiry_from_now(capsys, home):
    token = create(capsys, home, "--scope", "admin", "--expires", "30d")
    record = Keystore.open(home).list_tokens()[0]
    assert record.expires_at - record.created_at == pytest.approx(30 * 86400, abs=5)
    assert TOKEN.fullmatch(token)


def test_expires_accepts_an_iso_date(capsys, home):
    create(capsys, home, "--scope", "admin", "--expires", "2999-01-31")
    assert Keystore.open(home).list_tokens()[0].expires_at == datetime(2999, 1, 31, tzinfo=UTC).timestamp()


@pytest.mark.parametrize("when", ["soon", "0d", "2000-01-01"])
def test_bad_expiry_is_a_user_error(capsys, home, when):
    code, out, err = run(capsys, "tokens", "create", "--home", str(home), "--name", "n", "--scope", "admin",
                         "--expires", when)
    assert (code, out) == (2, "")
    assert err.startswith("seglock: error: --expires") and err.count("\n") == 1


def test_segment_token_without_model_is_a_user_error(capsys, home):
    code, out, err = run(capsys, "tokens", "create", "--home", str(home), "--name", "n", "--scope", "segment")
    assert (code, out) == (2, "")
    assert "needs at least one model" in err


def test_unknown_scope_is_an_argument_error(capsys, home):
    with pytest.raises(SystemExit) as info:
        main(["tokens", "create", "--home", str(home), "--name", "n", "--scope", "root"])
    assert info.value.code == 2


def test_list_shows_tokens_but_never_their_secrets(capsys, home):
    token = create(capsys, home, "--scope", "segment", "--model", "m1")
    for extra in ([], ["--json"]):
        code, out, _ = run(capsys, "tokens", "list", "--home", str(home), *extra)
        assert code == 0
        assert TOKEN.fullmatch(token).group(1) in out
        assert token.split("_")[2] not in out and "hash" not in out


def test_list_json_gives_status(capsys, home):
    create(capsys, home, "--scope", "admin")
    _, out, _ = run(capsys, "tokens", "list", "--home", str(home), "--json")
    assert [row["status"] for row in json.loads(out)] == ["active"]


def test_revoke_stops_the_token(capsys, home):
    token = create(capsys, home, "--scope", "admin")
    token_id = TOKEN.fullmatch(token).group(1)
    code, _, err = run(capsys, "tokens", "revoke", "--home", str(home), token_id)
    assert code == 0 and "now revoked" in err
    assert Keystore.open(home).check_token(token, scope="admin").reason == "revoked"


def test_revoke_accepts_a_whole_token_and_does_not_echo_it(capsys, home):
    token = create(capsys, home, "--scope", "admin")
    code, out, err = run(capsys, "tokens", "revoke", "--home", str(home), token)
    assert code == 0 and token.split("_")[2] not in out + err


def test_revoke_twice_says_already_revoked(capsys, home):
    token_id = TOKEN.fullmatch(create(capsys, home, "--scope", "admin")).group(1)
    run(capsys, "tokens", "revoke", "--home", str(home), token_id)
    code, _, err = run(capsys, "tokens", "revoke", "--home", str(home), token_id)
    assert code == 0 and "already revoked" in err


@pytest.mark.parametrize("token_id", ["0123456789ab", "nothex"])
def test_revoke_unknown_or_malformed_id_is_a_user_error(capsys, home, token_id):
    code, _, err = run(capsys, "tokens", "revoke", "--home", str(home), token_id)
    assert code == 2 and err.count("\n") == 1 and token_id in err


def test_missing_keystore_is_a_user_error_naming_init(capsys, tmp_path):
    code, _, err = run(capsys, "tokens", "list", "--home", str(tmp_path / "nowhere"))
    assert code == 2 and "seglock keystore init" in err and err.count("\n") == 1


def test_home_defaults_to_seglock_home_variable(capsys, home, monkeypatch):
    monkeypatch.setenv("SEGLOCK_HOME", str(home))
    assert run(capsys, "tokens", "list")[0] == 0


def test_wrong_master_key_is_a_user_error(capsys, home, monkeypatch):
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", OTHER)
    code, out, err = run(capsys, "tokens", "list", "--home", str(home))
    assert (code, out) == (2, "")
    assert "does not open this keystore" in err and err.count("\n") == 1


def test_damaged_keystore_exits_1_and_leaves_the_file(capsys, home):
    path = home / "keystore.json"
    data = bytearray(path.read_bytes())
    data[80] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, "keystore", "status", "--home", str(home))
    assert code == 1 and "KeystoreCorrupt" in err and err.count("\n") == 1
    assert path.read_bytes() == bytes(data)


def test_init_twice_is_a_user_error(capsys, home):
    code, _, err = run(capsys, "keystore", "init", "--home", str(home))
    assert code == 2 and "already exists" in err


def test_init_without_settings_makes_a_dev_master_key(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SEGLOCK_MASTER_KEY")
    code, _, err = run(capsys, "keystore", "init", "--home", str(tmp_path / "dev"))
    assert code == 0 and (tmp_path / "dev" / "master.key").exists()
    assert "production" in err


def test_status_summarises_without_secrets(capsys, home):
    token = create(capsys, home, "--scope", "admin")
    code, out, _ = run(capsys, "keystore", "status", "--home", str(home), "--json")
    summary = json.loads(out)
    assert code == 0
    assert (summary["tokens"], summary["master_key_source"], summary["file_mode"]) == (
        {"active": 1, "revoked": 0, "expired": 0}, "SEGLOCK_MASTER_KEY", "0o600"
    )
    assert token.split("_")[2] not in out and MASTER not in out


def test_status_text_names_the_file(capsys, home):
    code, out, _ = run(capsys, "keystore", "status", "--home", str(home))
    assert code == 0 and str(home / "keystore.json") in out


def test_change_master_key_moves_to_the_new_key(capsys, home, monkeypatch):
    token = create(capsys, home, "--scope", "admin")
    monkeypatch.setenv("SEGLOCK_NEW_MASTER_KEY", OTHER)
    code, _, err = run(capsys, "keystore", "change-master-key", "--home", str(home))
    assert code == 0 and "SEGLOCK_NEW_MASTER_KEY" in err
    assert run(capsys, "tokens", "list", "--home", str(home))[0] == 2  # the old key no longer opens it
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", OTHER)
    assert Keystore.open(home).verify_token(token, scope="admin") is not None


def test_change_master_key_without_a_new_key_is_a_user_error(capsys, home):
    code, _, err = run(capsys, "keystore", "change-master-key", "--home", str(home))
    assert code == 2 and "SEGLOCK_NEW_MASTER_KEY" in err


def test_audit_lists_changes(capsys, home):
    token_id = TOKEN.fullmatch(create(capsys, home, "--scope", "admin")).group(1)
    code, out, _ = run(capsys, "keystore", "audit", "--home", str(home), "--json")
    actions = [(e["actor"], e["action"], e["target"]) for e in map(json.loads, out.splitlines())]
    assert code == 0 and actions[-1] == ("cli", "token.create", token_id)


def test_group_without_action_prints_usage_and_exits_2(capsys):
    code, _, err = run(capsys, "tokens")
    assert code == 2 and "create" in err
