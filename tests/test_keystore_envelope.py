"""The keystore file: AEAD envelope, and a distinct refusal for each way opening can fail.

Every refusal leaves the file's bytes exactly as they were.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from seglock.keystore import (
    Keystore,
    KeystoreCorrupt,
    KeystoreNotFound,
    KeystoreTampered,
    KeystoreTruncated,
    UnsupportedFormatVersion,
    WrongMasterKey,
    envelope,
)

MASTER = base64.b64encode(bytes(range(32))).decode()
OTHER = base64.b64encode(bytes(range(1, 33))).decode()
ENV = {"SEGLOCK_MASTER_KEY": MASTER}


@pytest.fixture
def ks(tmp_path):
    store = Keystore.open(tmp_path / "home", create=True, env=ENV)
    store.create_token("alice", ["segment"], ["m1"])
    store.add_model_key("m1", "cp", {"perm": [2, 0, 1, 3]})
    return store


def put(path, data: bytes) -> None:
    """Replace the file's bytes (unlink first: truncating in place makes ext4 flush, 1 ms a time)."""
    path.unlink()
    path.write_bytes(data)


def rewrite(doc: dict) -> bytes:
    """File bytes for `doc` with a correct checksum (what a deliberate editor would write)."""
    doc = {k: v for k, v in doc.items() if k != "checksum"}
    body = json.dumps(doc, separators=(",", ":"))[:-1].encode()
    return body + b',"checksum":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def refused(path, error, env=ENV, match=None):
    """Opening `path`'s keystore raises `error` (exactly that class) and leaves the bytes alone."""
    before = path.read_bytes()
    with pytest.raises(error, match=match) as info:
        Keystore.open(path.parent, env=env)
    assert type(info.value) is error
    assert path.read_bytes() == before
    assert str(path) in str(info.value)
    return info.value


def test_file_is_one_json_document_with_the_header_in_clear(ks):
    doc = json.loads(ks.path.read_bytes())
    assert list(doc) == ["format", "version", "cipher", "kdf", "nonce", "key_check", "ciphertext", "checksum"]
    assert (doc["format"], doc["version"], doc["cipher"], doc["kdf"]) == (
        "seglock-keystore", 1, "AES-256-GCM", {"name": "none"}
    )
    assert len(base64.b64decode(doc["nonce"])) == 12
    stored = ks.path.read_bytes()  # quoted names: base64 may hold the bare letters
    assert b'"alice"' not in stored and b'"m1"' not in stored


def test_every_write_uses_a_fresh_nonce(ks):
    nonces = set()
    for i in range(5):
        ks.create_token(f"tick{i}", ["admin"])
        nonces.add(json.loads(ks.path.read_bytes())["nonce"])
    assert len(nonces) == 5


def test_missing_keystore_names_the_file_and_the_init_command(tmp_path):
    with pytest.raises(KeystoreNotFound) as info:
        Keystore.open(tmp_path, env=ENV)
    assert str(tmp_path / "keystore.json") in str(info.value)
    assert "seglock keystore init" in str(info.value)


def test_wrong_master_key_is_refused(ks):
    error = refused(ks.path, WrongMasterKey, env={"SEGLOCK_MASTER_KEY": OTHER})
    assert "SEGLOCK_MASTER_KEY" in str(error)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_any_flipped_byte_is_refused_as_damage_never_as_wrong_key_or_truncation(ks, mask):
    original = ks.path.read_bytes()
    for position in range(len(original)):
        damaged = bytearray(original)
        damaged[position] ^= mask
        put(ks.path, bytes(damaged))
        with pytest.raises(KeystoreCorrupt) as info:
            Keystore.open(ks.home, env=ENV)
        assert not isinstance(info.value, KeystoreTruncated), position
        assert ks.path.read_bytes() == bytes(damaged)


def test_flipped_ciphertext_byte_names_the_checksum(ks):
    data = bytearray(ks.path.read_bytes())
    data[data.index(b'"ciphertext":"') + 20] ^= 0x01
    put(ks.path, bytes(data))
    refused(ks.path, KeystoreCorrupt, match="checksum does not match")


def test_every_truncation_is_refused_as_truncated(ks):
    original = ks.path.read_bytes()
    for length in range(len(original)):
        put(ks.path, original[:length])
        with pytest.raises(KeystoreTruncated):
            Keystore.open(ks.home, env=ENV)
        assert ks.path.read_bytes() == original[:length]


def test_truncated_message_says_what_to_do(ks):
    put(ks.path, ks.path.read_bytes()[:100])
    error = refused(ks.path, KeystoreTruncated)
    assert "truncated" in str(error) and "restore it from a backup" in str(error)


def test_changed_ciphertext_with_a_recomputed_checksum_is_tampering(ks):
    doc = json.loads(ks.path.read_bytes())
    raw = bytearray(base64.b64decode(doc["ciphertext"]))
    raw[0] ^= 0x01
    doc["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    put(ks.path, rewrite(doc))
    refused(ks.path, KeystoreTampered, match="altered")


def test_header_is_bound_as_associated_data(ks):
    doc = json.loads(ks.path.read_bytes())
    doc["nonce"] = base64.b64encode(bytes(12)).decode()
    put(ks.path, rewrite(doc))
    refused(ks.path, KeystoreTampered)


def test_unknown_format_version_is_refused(ks):
    doc = json.loads(ks.path.read_bytes())
    doc["version"] = 2
    put(ks.path, rewrite(doc))
    error = refused(ks.path, UnsupportedFormatVersion, match="version 2")
    assert "reads version 1" in str(error)


def test_a_future_version_with_another_frame_is_refused_as_unsupported(ks):
    put(ks.path, json.dumps({"format": "seglock-keystore", "version": 7, "blob": "..."}).encode())
    refused(ks.path, UnsupportedFormatVersion, match="version 7")


def test_other_json_is_not_a_keystore(ks):
    put(ks.path, b'{"hello": "world"}\n')
    refused(ks.path, KeystoreCorrupt, match="not a seglock keystore")


def test_header_with_an_unknown_cipher_is_damage(ks):
    doc = json.loads(ks.path.read_bytes())
    doc["cipher"] = "ROT13"
    put(ks.path, rewrite(doc))
    refused(ks.path, KeystoreCorrupt, match="unknown cipher")


def test_header_asking_for_huge_scrypt_memory_is_refused_before_deriving(ks):
    doc = json.loads(ks.path.read_bytes())
    doc["kdf"] = {"name": "scrypt", "salt": base64.b64encode(bytes(16)).decode(), "n": 2**30, "r": 8, "p": 1}
    put(ks.path, rewrite(doc))
    refused(ks.path, KeystoreCorrupt, match="1 GiB")


def test_open_with_create_never_overwrites_a_damaged_file(ks):
    put(ks.path, ks.path.read_bytes()[:-30])
    before = ks.path.read_bytes()
    with pytest.raises(KeystoreTruncated):
        Keystore.open(ks.home, create=True, env=ENV)
    assert ks.path.read_bytes() == before


def test_a_write_through_a_stale_handle_never_overwrites_a_damaged_file(ks):
    data = bytearray(ks.path.read_bytes())
    data[60] ^= 0x01
    put(ks.path, bytes(data))
    with pytest.raises(KeystoreCorrupt):
        ks.create_token("bob", ["admin"])
    assert ks.path.read_bytes() == bytes(data)


def test_verify_through_a_stale_handle_refuses_a_damaged_file(ks):
    _, token = ks.create_token("bob", ["admin"])
    put(ks.path, ks.path.read_bytes()[:50])
    with pytest.raises(KeystoreTruncated):
        ks.verify_token(token, scope="admin")


def test_envelope_seal_and_parse_round_trip(tmp_path):
    keys = envelope.EnvelopeKeys(bytes(32))
    sealed = envelope.seal(b"plain text", keys, {"name": "none"})
    parsed = envelope.parse(sealed, tmp_path / "k.json")
    assert envelope.unseal(parsed, keys, tmp_path / "k.json", "test") == b"plain text"
    assert parsed.header.key_check == keys.check


def test_envelope_keys_repr_hides_them():
    keys = envelope.EnvelopeKeys(bytes(32))
    assert repr(keys) == "EnvelopeKeys(<hidden>)"
