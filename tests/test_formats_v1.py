"""Frozen known-answer files: every later seglock must still open a v1 keystore and a v1 artifact.

tests/fixtures/ holds files written once by seglock 0.1.0 (see tests/fixtures/README.md) and never
regenerated: a keystore.json with the test-only master.key beside it, and a tiny CP artifact with
its key file. Their SHA-256 digests are pinned below, so a rewrite shows up here; a format change
that cannot read them fails the other tests. Each test works on a copy, so opening never writes them.
"""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from seglock.client.transforms import BlockKey
from seglock.keystore import Keystore
from seglock.models import fold_key, load_artifact, read_manifest
from seglock.models.inputs import model_input
from seglock.models.keyfile import read_key_file
from seglock.models.protect import CPKey

FIXTURES = Path(__file__).parent / "fixtures"
FROZEN = {
    "keystore-v1/keystore.json": "87d3553f973810c1edad990007cc1c0d8ead3f112c72f1926f22e993e98e11f6",
    "keystore-v1/master.key": "195bddfb87807a1c1cbbcc6c5aaca88ced34ddbe86dbf291aeebd42a01f8a6d0",
    "keystore-v1/tokens.json": "6b82e4f668322fc8cbbdff8f4c3db02ae465b76b179271521d8e1ed5cb007b74",
    "artifact-v1/manifest.json": "52208fda057e65711ff8e19fa9ec7e2124dda61afaa4fabb17aefc7d403dc843",
    "artifact-v1/weights.safetensors": "8e0b8155b9497a3a19bbd810cdc8aa4d4e9cd5e1603f6a378f6c05705fb123e5",
    "artifact-v1.key.json": "a1c5a20265a2cc0242f733bb9dddf564f0cfe1362ab0a28cebe1b7b726adb06a",
}


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_the_frozen_files_are_unchanged(name):
    assert _sha256(FIXTURES / name) == FROZEN[name], f"{name} was rewritten: restore it from git, never regenerate it"


# -- keystore v1 ------------------------------------------------------------------------------------


@pytest.fixture
def keystore_v1(tmp_path):
    home = tmp_path / "home"
    shutil.copytree(FIXTURES / "keystore-v1", home)
    home.chmod(0o700)
    for name in ("keystore.json", "master.key"):
        (home / name).chmod(0o600)
    with Keystore.open(home, env={}) as store:
        yield store, home


def _tokens():
    import json

    return json.loads((FIXTURES / "keystore-v1" / "tokens.json").read_text())


def test_keystore_v1_opens_with_its_master_key_and_holds_the_same_model_keys(keystore_v1):
    store, _ = keystore_v1
    assert store.models() == ["demo-cp", "demo-shf"]
    versions = [(v.version, v.id, v.state, v.kind) for v in store.model_key_versions("demo-cp")]
    assert versions == [(1, "kb20d3351f1a8", "retiring", "cp"), (2, "kdbab05794c07", "active", "cp")]
    assert CPKey.from_dict(store.active_model_key("demo-cp").material).perm.tolist() == [6, 5, 7, 2, 3, 4, 0, 1]
    assert CPKey.from_dict(store.get_model_key("demo-cp", 1).material).perm.tolist() == [5, 0, 1, 4, 2, 6, 3, 7]
    shf = store.active_model_key("demo-shf")
    assert (shf.version, shf.id, shf.kind) == (1, "k875c252843b9", "block")
    assert BlockKey.from_dict(shf.material) == BlockKey.from_reference("shf", block_size=4, seed=7)


def test_keystore_v1_holds_the_same_tokens_and_grants(keystore_v1):
    store, _ = keystore_v1
    listed = [(t.id, t.name, t.scopes, t.models, t.revoked) for t in store.list_tokens()]
    assert listed == [
        ("58fe3b98a177", "fixture-admin", ("segment", "admin"), ("*",), False),
        ("5e87852c14ce", "fixture-client", ("segment",), ("demo-cp",), False),
        ("a90ccc240f52", "fixture-revoked", ("segment",), ("demo-shf",), True),
    ]
    tokens = _tokens()
    assert store.verify_token(tokens["client"], model="demo-cp", scope="segment").token_id == "5e87852c14ce"
    assert store.check_token(tokens["client"], model="demo-shf", scope="segment").reason == "model"
    assert store.verify_token(tokens["admin"], model="demo-shf", scope="admin").token_id == "58fe3b98a177"
    assert store.check_token(tokens["revoked"], model="demo-shf", scope="segment").reason == "revoked"


def test_opening_and_reading_keystore_v1_never_rewrites_it(keystore_v1):
    store, home = keystore_v1
    store.refresh()
    store.list_tokens(), store.models(), store.active_model_key("demo-cp"), store.audit_log()
    assert _sha256(home / "keystore.json") == FROZEN["keystore-v1/keystore.json"]


def test_keystore_v1_keeps_its_audit_log(keystore_v1):
    store, _ = keystore_v1
    log = store.audit_log()
    assert [(e.time, e.action, e.outcome) for e in log][:3] == [
        (1800000000.0, "keystore.create", "ok"), (1800000002.0, "model_key.add", "ok"),
        (1800000004.0, "model_key.activate", "ok")]
    assert [e.action for e in log[-2:]] == ["token.create", "token.revoke"]
    assert len(log) == 12


def test_keystore_v1_takes_new_writes_and_reads_them_back(keystore_v1):
    store, home = keystore_v1
    store.add_model_key("demo-shf", "block", BlockKey.from_reference("shf", block_size=4, seed=8).to_dict())
    with Keystore.open(home, env={}) as again:
        assert [v.state for v in again.model_key_versions("demo-shf")] == ["retiring", "active"]
        assert again.verify_token(_tokens()["client"], model="demo-cp", scope="segment") is not None


def test_keystore_v1_refuses_another_master_key(tmp_path):
    from seglock.keystore import MasterKey, WrongMasterKey

    home = tmp_path / "home"
    shutil.copytree(FIXTURES / "keystore-v1", home)
    with pytest.raises(WrongMasterKey):
        Keystore.open(home, env={}, master=MasterKey.generate("test"))


# -- artifact v1 ------------------------------------------------------------------------------------


def _image():
    """A fixed 32x32 RGB input: no randomness, the same bytes everywhere."""
    return torch.from_numpy(((np.arange(32 * 32 * 3).reshape(1, 32, 32, 3) * 37) % 256).astype(np.uint8))


def test_artifact_v1_manifest_reads_exactly():
    manifest = read_manifest(FIXTURES / "artifact-v1")
    assert (manifest.name, manifest.architecture, manifest.architecture_kwargs) == (
        "fixture-cp", "tiny", {"width": 4, "in_channels": 3})
    assert (manifest.num_classes, manifest.class_names, tuple(manifest.input_size)) == (
        3, ("background", "disc", "square"), (32, 32))
    assert manifest.protection == {"mode": "cp", "tap": "enc2", "channels": 8}
    assert (manifest.key.id, manifest.key.version) == ("file-0f1e2d3c4b5a", 1)
    assert (manifest.weights.file, manifest.weights.sha256, manifest.weights.bytes) == (
        "weights.safetensors", FROZEN["artifact-v1/weights.safetensors"], 15244)
    assert manifest.created == "2026-11-30T06:00:00+00:00"


def test_artifact_v1_key_file_holds_the_known_permutation():
    found = read_key_file(FIXTURES / "artifact-v1.key.json")
    assert (found.kind, found.model) == ("cp", "fixture-cp")
    assert found.key.perm.tolist() == [6, 7, 2, 1, 4, 5, 3, 0]


def test_artifact_v1_computes_the_same_logits_with_its_key():
    model, manifest = load_artifact(FIXTURES / "artifact-v1")
    key = read_key_file(FIXTURES / "artifact-v1.key.json").key
    with torch.inference_mode():
        x = model_input(_image(), manifest)
        logits = fold_key(model, "enc2", key).eval()(x).double()
        plain = model.eval()(x).double()
    assert logits.shape == (1, 3, 32, 32)
    assert float(logits.sum()) == pytest.approx(-411.0409459993243, rel=1e-6)
    assert logits[0, :, 5, 7].tolist() == pytest.approx([-0.120954, -0.049495, -0.23165], abs=1e-5)
    assert logits[0, :, 20, 30].tolist() == pytest.approx([-0.120753, -0.049241, -0.231341], abs=1e-5)
    assert float(plain.sum()) == pytest.approx(-415.91012835502625, rel=1e-6)  # without the key: other numbers
