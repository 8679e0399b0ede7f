"""Offline key files: a plain secret, written 0600 and atomically, read back exactly."""

import json
import os
import stat

import pytest

from seglock.client.transforms import BlockKey
from seglock.models.keyfile import KeyFile, KeyFileError, read_key_file, write_key_file
from seglock.models.protect import CPKey


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_cp_key_round_trips_with_its_model_name(tmp_path):
    key = CPKey.generate(32)
    path = write_key_file(tmp_path / "m.json", key, model="demo-cp")
    found = read_key_file(path)
    assert found.kind == "cp" and found.model == "demo-cp"
    assert found.key == key
    assert found.key.perm.tolist() == key.perm.tolist()


@pytest.mark.parametrize("method", ["shf", "np", "ffx"])
def test_block_key_round_trips(tmp_path, method):
    key = BlockKey.generate(method, 4)
    found = read_key_file(write_key_file(tmp_path / "k.json", key))
    assert found.kind == "block" and found.model is None
    assert found.key == key and found.key.method == method and found.key.block_size == 4


def test_file_format_is_the_documented_json(tmp_path):
    key = CPKey.generate(4)
    path = write_key_file(tmp_path / "k.json", key, model="m")
    data = json.loads(path.read_text())
    assert data == {"format": "seglock-key", "format_version": 1, "kind": "cp", "model": "m",
                    "material": key.to_dict()}


def test_key_file_is_0600_and_no_temp_file_is_left(tmp_path):
    path = write_key_file(tmp_path / "k.json", CPKey.generate(8))
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]


def test_overwrite_is_refused_unless_asked(tmp_path):
    path = tmp_path / "k.json"
    first, second = CPKey.generate(8), CPKey.generate(8)
    write_key_file(path, first)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(path, second)
    assert read_key_file(path).key == first
    write_key_file(path, second, overwrite=True)
    assert read_key_file(path).key == second
    assert _mode(path) == 0o600


def test_repr_never_shows_material(tmp_path):
    key = BlockKey.generate("ffx", 2)
    found = read_key_file(write_key_file(tmp_path / "k.json", key, model="m"))
    shown = repr(found) + str(found)
    assert "permutation" not in shown and key.to_dict()["password"] not in shown
    cp = CPKey(list(range(19, -1, -1)))
    shown = repr(read_key_file(write_key_file(tmp_path / "c.json", cp)))
    assert "19, 18" not in shown and isinstance(found, KeyFile)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(KeyFileError, match=r"k\.json does not exist"):
        read_key_file(tmp_path / "k.json")


def test_a_directory_is_not_a_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="is a directory"):
        read_key_file(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe not text", "is not JSON"),
        (b"{", "is not JSON"),
        (b"[]", "is not a seglock-key file"),
        (json.dumps({"format": "other"}).encode(), "is not a seglock-key file"),
        (json.dumps({"format": "seglock-key", "format_version": 2}).encode(), "format_version 2"),
        (json.dumps({"format": "seglock-key", "format_version": 1, "kind": "cp"}).encode(), "fields missing"),
        (json.dumps({"format": "seglock-key", "format_version": 1, "kind": "rsa", "model": None,
                     "material": {}}).encode(), "kind must be"),
        (json.dumps({"format": "seglock-key", "format_version": 1, "kind": "cp", "model": "../x",
                     "material": {}}).encode(), "model must be"),
    ],
)
def test_malformed_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=message) as info:
        read_key_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_material_is_not_echoed_in_the_error(tmp_path):
    secret_like = [5, 3, 3, 1, 0, 2]  # not a permutation
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "seglock-key", "format_version": 1, "kind": "cp", "model": None,
                                "material": {"format": "seglock-cp-key", "version": 1, "perm": secret_like}}))
    with pytest.raises(KeyFileError, match="not a valid cp key") as info:
        read_key_file(path)
    assert "5, 3, 3" not in str(info.value)


def test_kind_must_match_the_material(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"format": "seglock-key", "format_version": 1, "kind": "block", "model": None,
                                "material": CPKey.generate(4).to_dict()}))
    with pytest.raises(KeyFileError, match="not a valid block key"):
        read_key_file(path)


def test_only_model_keys_can_be_written(tmp_path):
    with pytest.raises(KeyFileError, match="CPKey or a BlockKey"):
        write_key_file(tmp_path / "k.json", {"perm": [1, 0]})
    with pytest.raises(KeyFileError, match="does not exist"):
        write_key_file(tmp_path / "no" / "k.json", CPKey.generate(4))
    assert not (tmp_path / "k.json").exists()
