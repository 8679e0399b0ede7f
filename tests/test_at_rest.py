"""Weights encrypted at rest in a home (DESIGN Additions "At rest"), `models export` and `models encrypt`."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import stat
import struct

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save

from seglock.app.cli import main
from seglock.app.home import Home
from seglock.keystore import Keystore
from seglock.models import CPKey, at_rest, fold_key, load_artifact, read_manifest, save_artifact
from seglock.models.data import generate_scene
from seglock.models.errors import ArtifactError
from seglock.models.keyfile import read_key_file
from seglock.models.zoo import zoo_dir
from tests.server_fixtures import MASTER_KEY, live_server, make_artifacts, open_keystore, png_bytes, scene

KEY = at_rest.DataKey("d0123456789ab", bytes(range(32)))
AAD = at_rest.associated_data("m", 1)


# -- the format ------------------------------------------------------------------------------------


def test_seal_round_trips_in_chunks_and_binds_header_chunks_model_and_revision():
    plain = bytes(range(256)) * 41 + b"tail"  # 10500 bytes: 3 chunks of 4096, the last 2308
    sealed = at_rest.seal(plain, KEY, AAD, chunk_bytes=4096)
    header, offset = at_rest.read_header(sealed)
    assert sealed[:8] == at_rest.MAGIC == b"\x89SLKWTS\n"
    assert header == {"format": "seglock-weights-at-rest", "version": 1, "cipher": "AES-256-GCM",
                      "key_id": "d0123456789ab", "chunk_bytes": 4096, "chunks": 3, "plain_bytes": 10500}
    assert len(sealed) == offset + 3 * (12 + 16) + 10500
    assert at_rest.unseal(sealed, KEY, AAD) == plain
    assert at_rest.seal(plain, KEY, AAD, chunk_bytes=4096) != sealed  # fresh nonces every time
    assert at_rest.unseal(at_rest.seal(b"", KEY, AAD), KEY, AAD) == b""
    first = offset + 12 + 4096 + 16  # where chunk 2 starts
    wrong = {
        "other revision": (sealed, KEY, at_rest.associated_data("m", 2)),
        "other model": (sealed, KEY, at_rest.associated_data("n", 1)),
        "other key": (sealed, at_rest.DataKey(KEY.id, bytes(32)), AAD),
        "a flipped bit": (sealed[:-1] + bytes([sealed[-1] ^ 1]), KEY, AAD),
        "cut short": (sealed[:-20], KEY, AAD),
        "a dropped chunk": (sealed[:first] + sealed[first + 12 + 4096 + 16:], KEY, AAD),
        "swapped chunks": (sealed[:offset] + sealed[first:first + 4124] + sealed[offset:first] + sealed[first + 4124:],
                           KEY, AAD),
        "bytes appended": (sealed + b"\0", KEY, AAD),
    }
    for label, (data, key, aad) in wrong.items():
        with pytest.raises(ArtifactError):
            at_rest.unseal(data, key, aad)
        assert label
    with pytest.raises(ArtifactError, match="data key d0123456789ab"):
        at_rest.unseal(sealed, at_rest.DataKey("dffffffffffff", KEY.key), AAD)
    tampered = sealed.replace(b'"chunk_bytes":4096', b'"chunk_bytes":4097')  # same length, header authenticated
    with pytest.raises(ArtifactError):
        at_rest.unseal(tampered, KEY, AAD)
    assert "key=" not in repr(KEY) and str(bytes(range(32))) not in repr(KEY)


def test_a_safetensors_reader_refuses_a_sealed_file(tmp_path):
    plain = save({"w": torch.arange(64, dtype=torch.float32)})
    path = tmp_path / "weights.safetensors"
    path.write_bytes(at_rest.seal(plain, KEY, AAD))
    assert struct.unpack("<Q", at_rest.MAGIC)[0] > 1 << 56  # what a reader takes as the header length
    with pytest.raises(SafetensorError):
        load_file(str(path))
    with pytest.raises(SafetensorError):
        load_safetensors(path.read_bytes())


# -- the keystore's data keys ----------------------------------------------------------------------


def test_a_data_key_is_made_once_per_model_and_survives_reopening(tmp_path):
    store = open_keystore(tmp_path)
    assert store.data_key("m") is None
    made = store.data_key("m", create=True, actor="test")
    assert made[0].startswith("d") and len(made[1]) == 32
    assert store.data_key("m", create=True) == made and store.data_key("n", create=True) != made
    store.close()
    again = Keystore.open(tmp_path, env={"SEGLOCK_MASTER_KEY": MASTER_KEY})
    assert again.data_key("m") == made
    assert again.status()["data_keys"] == ["m", "n"]
    assert made[1] not in (tmp_path / "keystore.json").read_bytes()  # sealed by the master key
    assert [e.action for e in again.audit_log() if e.action.startswith("data_key")] == ["data_key.add"] * 2


# -- a home ----------------------------------------------------------------------------------------


def masks(module: torch.nn.Module, manifest) -> np.ndarray:
    from seglock.models.inputs import model_input

    batch = torch.from_numpy(np.stack([scene(i, 32, 32) for i in range(3)]))
    with torch.inference_mode():
        return module.eval()(model_input(batch, manifest)).argmax(dim=1).numpy()


@pytest.fixture()
def cp_home(tmp_path):
    artifacts = make_artifacts(tmp_path / "artifacts")
    home = Home(tmp_path / "home", open_keystore(tmp_path / "home"))
    home.import_artifact(artifacts["cp"][0], key=artifacts["cp"][1], actor="test")
    home.import_artifact(artifacts["plain"][0], actor="test")
    yield home, artifacts
    home.keystore.close()


def test_home_revisions_are_sealed_and_served_from_memory(cp_home):
    home, artifacts = cp_home
    for name in ("cp", "plain"):
        path = home.revision_dir(name, 1)
        data = (path / "weights.safetensors").read_bytes()
        manifest = read_manifest(path)
        plain = at_rest.unseal(data, at_rest.DataKey(*home.keystore.data_key(name)), at_rest.associated_data(name, 1))
        assert at_rest.is_sealed(data) and home.is_encrypted(path)
        assert (hashlib.sha256(plain).hexdigest(), len(plain)) == (manifest.weights.sha256, manifest.weights.bytes)
        with pytest.raises(ArtifactError, match="encrypted at rest"):
            load_artifact(path)
    source, _ = load_artifact(artifacts["plain"][0])
    module, manifest, _ = home.serving_module("plain", home.revision_dir("plain", 1))
    np.testing.assert_array_equal(masks(module, manifest), masks(source, manifest))
    served, manifest, _ = home.serving_module("cp", home.revision_dir("cp", 1))
    np.testing.assert_array_equal(masks(served, manifest), masks(source, manifest))  # cp post hoc: exact
    rotation = home.rotate_key("cp")
    path = home.revision_dir("cp", rotation.revision)
    assert home.is_encrypted(path)
    rotated, manifest, _ = home.serving_module("cp", path)
    np.testing.assert_array_equal(masks(rotated, manifest), masks(source, manifest))
    # a revision copied under another revision's name does not open
    moved = home.revision_dir("cp", 9)
    shutil.copytree(path, moved)
    with pytest.raises(ArtifactError, match="does not decrypt"):
        home.load_revision("cp", moved)


def test_a_plain_revision_from_an_older_home_loads_and_is_encrypted_by_the_encrypt_command(tmp_path, capsys):
    artifacts = make_artifacts(tmp_path / "artifacts")
    home_path = tmp_path / "home"
    with open_keystore(home_path) as store:
        Home(home_path, store).import_artifact(artifacts["cp"][0], key=artifacts["cp"][1], actor="test")
        model, manifest = Home(home_path, store).load_revision("cp", Home(home_path).revision_dir("cp", 1))
    # what seglock wrote before at-rest encryption: the same revision with plain weights
    save_artifact(model, Home(home_path).revision_dir("cp", 1), name="cp", class_names=list(manifest.class_names),
                  input_size=list(manifest.input_size), protection={"mode": "cp", "tap": "dec2"}, key=manifest.key,
                  normalization=manifest.normalization, overwrite=True)
    revision = Home(home_path).revision_dir("cp", 1)
    load_file(str(revision / "weights.safetensors"))  # plain, as before
    with open_keystore(home_path) as store:
        home = Home(home_path, store)
        before = masks(*home.serving_module("cp", revision)[:2])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGLOCK_MASTER_KEY", MASTER_KEY)
        assert main(["models", "encrypt", "--home", str(home_path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"home": str(home_path), "encrypted": {"cp": [1]},
                                                        "revisions": 1}
        assert main(["models", "encrypt", "--home", str(home_path), "--model", "cp"]) == 0
        assert "none (all already encrypted)" in capsys.readouterr().out
        assert main(["models", "encrypt", "--home", str(home_path), "--model", "nope"]) == 2
        assert "has no model 'nope'" in capsys.readouterr().err
    with pytest.raises(SafetensorError):
        load_file(str(revision / "weights.safetensors"))
    with open_keystore(home_path) as store:
        home = Home(home_path, store)
        assert home.is_encrypted(revision)
        np.testing.assert_array_equal(masks(*home.serving_module("cp", revision)[:2]), before)


# -- export / import -------------------------------------------------------------------------------


def test_export_writes_the_keyed_weights_as_a_plain_artifact_and_import_takes_it_back(cp_home, tmp_path, capsys,
                                                                                       monkeypatch):
    home, artifacts = cp_home
    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER_KEY)
    home.rotate_key("cp")  # r2, key v2
    revision = home.serving_revision("cp")
    out, key_out = tmp_path / "exported", tmp_path / "cp.key.json"
    args = ["models", "export", "--home", str(home.path), "--model", "cp", "--out", str(out)]
    assert main([*args, "--key-out", str(key_out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    home_manifest, exported = read_manifest(revision), read_manifest(out)
    assert result["revision"] == 2 and result["key"] == {"id": home_manifest.key.id, "version": 2}
    assert result["sha256"] == exported.weights.sha256 == home_manifest.weights.sha256
    weights = (out / "weights.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == exported.weights.sha256 and len(weights) == exported.weights.bytes
    assert stat.S_IMODE(key_out.stat().st_mode) == 0o600
    key = read_key_file(key_out).key
    assert isinstance(key, CPKey) and key.to_dict() == home.model_key(home_manifest).to_dict()
    # the exported weights are the protected ones: they differ from the folded (served) ones at the tap
    model, _ = load_artifact(out)
    stored = load_file(str(out / "weights.safetensors"))
    folded = fold_key(model, "dec2", key).state_dict()
    differing = sorted(k for k in stored if not torch.equal(stored[k], folded[k]))
    assert differing and len(differing) < len(stored)
    served, manifest, _ = home.serving_module("cp", revision)
    # back into another home with the key file: re-keyed there, identical masks
    other = tmp_path / "other"
    assert main(["models", "import", "--home", str(other), "--model", str(out), "--key-file", str(key_out)]) == 0
    with open_keystore(other) as store:
        second = Home(other, store)
        assert second.is_encrypted(second.revision_dir("cp", 1))
        module, manifest2, _ = second.serving_module("cp", second.revision_dir("cp", 1))
        np.testing.assert_array_equal(masks(module, manifest2), masks(served, manifest))
        assert second.model_key(manifest2).to_dict() != key.to_dict()
    # plain artifacts are still imported as before
    assert main(["models", "import", "--home", str(other), "--model", str(artifacts["plain"][0])]) == 0
    capsys.readouterr()
    # refusals, one line each
    assert main(args) == 2 and "already exists and is not empty" in capsys.readouterr().err
    assert main(["models", "export", "--home", str(home.path), "--model", "plain", "--out", str(tmp_path / "p"),
                 "--key-out", str(tmp_path / "p.json")]) == 2
    assert "has no key to write" in capsys.readouterr().err
    assert main(["models", "export", "--home", str(home.path), "--model", "nope", "--out", str(tmp_path / "n")]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    # a copied home revision is refused by import, with the way out named
    assert main(["models", "import", "--home", str(tmp_path / "third"), "--model", str(revision),
                 "--key-file", str(key_out)]) == 2
    assert "models export" in capsys.readouterr().err


# -- a served home, copied -------------------------------------------------------------------------


def _known_sequences(arrays: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """A 64-byte run from the middle of every float32 tensor of >= 32 distinct values."""
    found = {}
    for name, tensor in arrays.items():
        flat = tensor.detach().float().flatten().contiguous()
        if tensor.dtype == torch.float32 and flat.numel() >= 32 and flat.unique().numel() >= 32:
            middle = flat.numel() // 2 - 8
            found[name] = flat[middle:middle + 16].numpy().tobytes()
    return found


def _segment(base: str, model: str, image: bytes, token: str) -> np.ndarray:
    response = httpx.post(f"{base}/v1/models/{model}/segment", files={"image": ("s.png", image)},
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_a_copied_models_folder_of_a_served_home_yields_no_weight_tensor(tmp_path):
    home_path = tmp_path / "home"
    scenes = [png_bytes(generate_scene(seed=7, index=i, size=128)[0]) for i in range(3)]
    with live_server(home_path) as live:
        tokens = json.loads((home_path / "initial-tokens.json").read_text())
        base, client = live["base"], tokens["client"]
        before = {m: [_segment(base, m, s, client) for s in scenes] for m in ("demo-cp", "demo-plain", "demo-shf")}
        shutil.copytree(home_path / "models", tmp_path / "after-import")
        rotated = httpx.post(f"{base}/admin/models/demo-cp/rotate-key",
                             headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=60)
        assert rotated.status_code == 200, rotated.text
        shutil.copytree(home_path / "models", tmp_path / "after-rotation")
        for model, masks_before in before.items():
            for image, mask in zip(scenes, masks_before, strict=True):
                np.testing.assert_array_equal(_segment(base, model, image, client), mask)  # byte-identical
    # what the thief might look for: the bundled weights, and the home's keyed and folded weights
    known: dict[str, bytes] = {}
    for name in ("demo-cp", "demo-plain", "demo-shf", "demo-per-image"):
        known.update({f"zoo {name} {k}": v
                      for k, v in _known_sequences(load_file(str(zoo_dir() / name / "weights.safetensors"))).items()})
    with open_keystore(home_path) as store:
        home = Home(home_path, store)
        for name in home.model_names():
            path = home.serving_revision(name)
            model, manifest = home.load_revision(name, path)
            known.update({f"{name} r{path.name} {k}": v for k, v in _known_sequences(model.state_dict()).items()})
            module, _, _ = home.serving_module(name, path)
            known.update({f"{name} folded {k}": v for k, v in _known_sequences(module.state_dict()).items()})
    assert len(known) > 50
    files = [p for folder in ("after-import", "after-rotation") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    weights = [p for p in files if p.name == "weights.safetensors"]
    assert len(weights) == 8  # 4 models x 2 copies
    for path in weights:
        with pytest.raises(SafetensorError):
            load_file(str(path))
        with pytest.raises(ArtifactError, match="encrypted at rest"):
            load_artifact(path.parent)
    for path in files:
        data = path.read_bytes()
        leaked = [label for label, sequence in known.items() if sequence in data]
        assert leaked == [], f"{path} holds {leaked[:3]}"
