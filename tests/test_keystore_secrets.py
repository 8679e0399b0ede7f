"""No secret made during a run shows up in logs, exception texts, reprs, CLI output or the audit log."""

from __future__ import annotations

import base64
import json
import logging
import secrets

import pytest

from seglock.app.cli import main
from seglock.keystore import Keystore, KeystoreError, MasterKey, ScryptParams
from seglock.keystore.tokens import hash_secret

FAST = ScryptParams(n=2**4, r=8, p=1)


class Secrets:
    """Every secret the run makes, in each form it could leak in."""

    def __init__(self) -> None:
        self.values: set[str] = set()

    def token(self, token: str) -> str:
        secret = token.rsplit("_", 1)[1]
        self.values |= {token, secret, hash_secret(secret).hex(), repr(hash_secret(secret))}
        return token

    def key(self, raw: bytes) -> str:
        b64 = base64.b64encode(raw).decode()
        self.values |= {b64, raw.hex(), repr(raw)}
        return b64

    def text(self, value: str) -> str:
        self.values.add(value)
        return value

    def found_in(self, text: str) -> list[str]:
        return sorted(s for s in self.values if s in text)


def test_no_secret_appears_in_logs_errors_reprs_or_cli_output(tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    leaks = Secrets()
    seen: list[str] = []  # every text that must hold no secret

    def expect_error(fn, *args, **kwargs):
        with pytest.raises(KeystoreError) as info:
            fn(*args, **kwargs)
        seen.extend([str(info.value), repr(info.value)])

    for name in ("SEGLOCK_MASTER_KEY", "SEGLOCK_MASTER_PASSPHRASE", "SEGLOCK_NEW_MASTER_KEY", "SEGLOCK_HOME"):
        monkeypatch.delenv(name, raising=False)
    master = leaks.key(secrets.token_bytes(32))
    wrong = leaks.key(secrets.token_bytes(32))
    passphrase = leaks.text("passphrase-" + secrets.token_hex(8))
    password = leaks.text("ffx-" + secrets.token_hex(8))
    perm = list(range(64))
    secrets.SystemRandom().shuffle(perm)
    leaks.text(json.dumps(perm)[1:-1])
    env = {"SEGLOCK_MASTER_KEY": master}

    # Library: every record kind, every refusal.
    home = tmp_path / "lib"
    ks = Keystore.open(home, create=True, env=env)
    record, token = ks.create_token("svc", ["segment"], ["m"], actor="admin")
    leaks.token(token)
    _, admin = ks.create_token("ops", ["admin"])
    leaks.token(admin)
    cp = ks.add_model_key("m", "cp", {"perm": perm})
    block = ks.add_model_key("b", "block", {"method": "ffx", "block_size": 4, "password": password})
    checked = (ks.verify_token(token, model="m"), ks.check_token(token, model="x"))
    seen += [repr(x) for x in (record, cp, block, ks, *checked)]
    ks.audit("admin.request", token, "denied", actor=record.id, detail=f"Authorization: Bearer {admin}")
    ks.revoke_token(record.id)
    seen.append(repr(ks.check_token(token, model="m")))
    expect_error(Keystore.open, home, env={"SEGLOCK_MASTER_KEY": wrong})
    expect_error(Keystore.open, home, env={"SEGLOCK_MASTER_KEY": master[:-4]})
    expect_error(Keystore.open, home, env={"SEGLOCK_MASTER_PASSPHRASE": passphrase})
    expect_error(ks.add_model_key, "m", "block", {"method": "ffx", "block_size": 4, "password": ""})
    expect_error(ks.add_model_key, "m", "cp", {"perm": perm + [0]})
    expect_error(ks.revoke_token, token)
    expect_error(ks.destroy_model_key, "m", 1)
    ks.change_master_key(MasterKey.from_passphrase(passphrase, "new passphrase"), scrypt=FAST)
    expect_error(Keystore.open, home, env={"SEGLOCK_MASTER_PASSPHRASE": passphrase + "x"})
    reopened = Keystore.open(home, env={"SEGLOCK_MASTER_PASSPHRASE": passphrase})
    seen += [json.dumps(reopened.status()), json.dumps([r.public_dict() for r in reopened.list_tokens()])]
    seen += [json.dumps(e.to_json()) for e in reopened.audit_log()]
    data = bytearray(reopened.path.read_bytes())
    data[-70] ^= 1
    reopened.path.write_bytes(bytes(data))
    expect_error(Keystore.open, home, env={"SEGLOCK_MASTER_PASSPHRASE": passphrase})

    # Command line: the token printed by `tokens create` is the one output allowed to hold one.
    cli_home = str(tmp_path / "cli")
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", master)
    assert main(["keystore", "init", "--home", cli_home]) == 0
    assert main(["tokens", "create", "--home", cli_home, "--name", "w", "--scope", "segment", "--model", "m"]) == 0
    out, err = capsys.readouterr()
    leaks.token(out.strip())
    seen.append(err)
    for argv in (
        ["tokens", "list", "--home", cli_home],
        ["tokens", "list", "--home", cli_home, "--json"],
        ["tokens", "revoke", "--home", cli_home, out.strip()],
        ["tokens", "revoke", "--home", cli_home, "slk_" + out.strip()[4:10] + "_" + out.strip()[-64:]],
        ["keystore", "status", "--home", cli_home, "--json"],
        ["keystore", "audit", "--home", cli_home],
    ):
        main(argv)
        seen.extend(capsys.readouterr())
    monkeypatch.setenv("SEGLOCK_NEW_MASTER_KEY", wrong)
    assert main(["keystore", "change-master-key", "--home", cli_home]) == 0
    assert main(["tokens", "list", "--home", cli_home]) == 2  # the old key from SEGLOCK_MASTER_KEY
    seen.extend(capsys.readouterr())

    seen.append(caplog.text)
    seen += [record.getMessage() for record in caplog.records]
    assert len(leaks.values) >= 20
    assert leaks.found_in("\n".join(seen)) == []


def test_keystore_file_holds_no_secret_in_clear(tmp_path):
    leaks = Secrets()
    env = {"SEGLOCK_MASTER_KEY": leaks.key(secrets.token_bytes(32))}
    ks = Keystore.open(tmp_path, create=True, env=env)
    leaks.token(ks.create_token("svc", ["segment"], ["m"])[1])
    password = leaks.text("ffx-" + secrets.token_hex(8))
    ks.add_model_key("b", "block", {"method": "ffx", "block_size": 4, "password": password})
    files = "".join(p.read_bytes().decode("latin-1") for p in tmp_path.iterdir() if p.is_file())
    assert leaks.found_in(files) == []
