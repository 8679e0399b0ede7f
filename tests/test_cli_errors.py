"""`seglock`'s one error translation: user errors are one line and exit code 2, the rest exit 1."""

import argparse
import base64
import os
import subprocess
import sys

import pytest

from seglock.app import cli
from seglock.app.cli import CLIError, main, user_error_message
from seglock.app.errors import ModelExists
from seglock.app.settings import Settings
from seglock.keystore.errors import KeystoreCorrupt, WrongMasterKey
from seglock.models.data import DatasetError
from seglock.models.errors import ArtifactError
from seglock.models.keyfile import KeyFileError


@pytest.mark.parametrize("error", [
    CLIError("--n must be at least 1"),
    WrongMasterKey("the master key does not open x"),
    ArtifactError("x has no manifest.json"),
    DatasetError("cannot tell the data format of x"),
    KeyFileError("x is not a key file"),
    ModelExists("model m already exists"),
    FileNotFoundError("no JSON results under runs/"),
])
def test_user_errors_keep_their_message(error):
    assert user_error_message(error) == str(error)


@pytest.mark.parametrize("error", [KeystoreCorrupt("x is damaged"), RuntimeError("bug"), KeyError("k"),
                                   OSError(5, "io")])
def test_other_errors_are_not_user_errors(error):
    assert user_error_message(error) is None


def test_an_invalid_setting_is_one_line_naming_the_field():
    with pytest.raises(Exception) as caught:
        Settings(port=70000)
    assert user_error_message(caught.value) == "port: Input should be less than or equal to 65535"


def _main_raising(monkeypatch, error):
    def build_parser():
        parser = argparse.ArgumentParser(prog="seglock")
        parser.set_defaults(handler=lambda args: (_ for _ in ()).throw(error))
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    return main([])


def test_main_prints_a_user_error_as_one_line_and_exits_2(monkeypatch, capsys):
    assert _main_raising(monkeypatch, ArtifactError("m has no manifest.json")) == 2
    assert capsys.readouterr().err == "seglock: error: m has no manifest.json\n"


def test_main_names_the_type_of_other_errors_and_exits_1(monkeypatch, capsys):
    assert _main_raising(monkeypatch, KeystoreCorrupt("k is damaged")) == 1
    assert capsys.readouterr().err == "seglock: error: KeystoreCorrupt: k is damaged\n"


def test_main_exits_130_on_interrupt(monkeypatch, capsys):
    assert _main_raising(monkeypatch, KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "seglock: interrupted\n"


def test_an_invalid_serve_flag_is_a_user_error(capsys, tmp_path, monkeypatch):
    for name in ("SEGLOCK_HOME", "SEGLOCK_PORT"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever serve sets
    assert main(["serve", "--home", str(tmp_path), "--port", "70000"]) == 2
    assert capsys.readouterr().err == "seglock: error: port: Input should be less than or equal to 65535\n"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_a_wrong_or_malformed_master_key_is_one_line_and_changes_nothing(tmp_path, workers):
    """Checked before any worker starts: one line and exit 2, not a traceback from each worker."""
    made_with = base64.b64encode(os.urandom(32)).decode()
    env = {**os.environ, "SEGLOCK_MASTER_KEY": made_with}
    subprocess.run([sys.executable, "-m", "seglock.app.cli", "keystore", "init", "--home", str(tmp_path)],
                   env=env, check=True, capture_output=True)
    before = (tmp_path / "keystore.json").read_bytes()
    wrong, malformed = base64.b64encode(os.urandom(32)).decode(), "not-base64"
    for key, message in ((wrong, "the master key from SEGLOCK_MASTER_KEY does not open this keystore"),
                         (malformed, "SEGLOCK_MASTER_KEY: a master key must be base64 of 32 bytes")):
        served = subprocess.run(
            [sys.executable, "-m", "seglock.app.cli", "serve", "--home", str(tmp_path), "--port", "0",
             "--device", "cpu", "--workers", workers], env={**env, "SEGLOCK_MASTER_KEY": key},
            capture_output=True, text=True, timeout=120)
        assert served.returncode == 2, served.stderr[-2000:]
        errors = [line for line in served.stderr.splitlines() if " INFO " not in line]
        assert len(errors) == 1 and errors[0].startswith("seglock: error: ") and message in errors[0], errors
        assert key not in served.stderr + served.stdout and made_with not in served.stderr + served.stdout
    assert (tmp_path / "keystore.json").read_bytes() == before
