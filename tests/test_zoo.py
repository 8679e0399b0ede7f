"""The bundled demo models: loadable, small, keyless manifests, public keys that fit."""

import json

import pytest
import torch

from seglock.keystore import Keystore
from seglock.models import fold_key, load_artifact, read_manifest
from seglock.models.data import open_dataset, write_synth_dataset
from seglock.models.inputs import model_input
from seglock.models.keyfile import read_key_file
from seglock.models.zoo import DEMO_MODELS, key_file, zoo_dir

MAX_BYTES = 10 * 1024 * 1024
MODES = {"demo-plain": "none", "demo-cp": "cp", "demo-shf": "shf", "demo-per-image": "per-image"}


@pytest.fixture(scope="module")
def images():
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        write_synth_dataset(root, 6, seed=9, size=128, val_fraction=0.5)
        data = open_dataset(root, "all", size=128)
        return torch.stack([data[i][0] for i in range(len(data))])


def test_the_zoo_is_the_four_demo_models_in_the_package_folder():
    assert DEMO_MODELS == ("demo-plain", "demo-cp", "demo-shf", "demo-per-image")
    assert zoo_dir() == (zoo_dir().parent / "zoo") and (zoo_dir() / "__init__.py").is_file()


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_every_demo_model_loads_as_its_mode(name):
    model, manifest = load_artifact(zoo_dir() / name)
    assert manifest.name == name and manifest.mode == MODES[name]
    assert manifest.architecture == "tiny" and manifest.input_size == (128, 128)
    assert manifest.num_classes == 6


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_every_demo_file_is_at_most_10_mb(name):
    for path in (zoo_dir() / name).iterdir():
        assert path.stat().st_size <= MAX_BYTES, path
    assert sorted(p.name for p in (zoo_dir() / name).iterdir()) == ["manifest.json", "weights.safetensors"]


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_no_manifest_carries_key_material(name):
    text = (zoo_dir() / name / "manifest.json").read_text()
    for word in ("perm", "permutation", "password", "material", "secret"):
        assert word not in text
    if name in ("demo-cp", "demo-shf"):
        material = read_key_file(key_file(name)).key.to_dict()
        secrets = list(material.get("taps", {}).values()) or [material.get("perm") or material.get("permutation")]
        assert all(json.dumps(secret)[1:-1] not in text for secret in secrets)


def test_bundled_key_files_are_the_keyed_demos_keys():
    cp, shf = read_key_file(key_file("demo-cp")), read_key_file(key_file("demo-shf"))
    protection = read_manifest(zoo_dir() / "demo-cp").protection
    assert (cp.kind, cp.model) == ("cp", "demo-cp")
    assert list(cp.key.tap_channels) == protection["tap"].split(",")  # the default tap set: every tap of tiny
    assert list(cp.key.tap_channels.values()) == protection["channels"]
    assert (shf.kind, shf.model, shf.key.method, shf.key.block_size) == ("block", "demo-shf", "shf", 4)
    assert not key_file("demo-plain").exists() and not key_file("demo-per-image").exists()
    assert sorted(p.name for p in (zoo_dir() / "keys").iterdir()) == ["demo-cp.json", "demo-shf.json"]


def test_demo_cp_with_its_bundled_key_gives_exactly_demo_plains_masks(images):
    plain, plain_manifest = load_artifact(zoo_dir() / "demo-plain")
    cp, cp_manifest = load_artifact(zoo_dir() / "demo-cp")
    key = read_key_file(key_file("demo-cp")).key
    with torch.no_grad():
        expected = plain(model_input(images, plain_manifest)).argmax(1)
        keyed = fold_key(cp, cp_manifest.protection["tap"], key)(model_input(images, cp_manifest)).argmax(1)
        stolen = cp(model_input(images, cp_manifest)).argmax(1)
    assert torch.equal(keyed, expected)
    assert not torch.equal(stolen, expected)


def test_a_fresh_home_imports_every_demo(tmp_path):
    from seglock.app.bootstrap import import_demo_models

    with Keystore.open(tmp_path, create=True) as store:
        assert import_demo_models(tmp_path, store) == list(DEMO_MODELS)
        assert store.active_model_key("demo-cp") is not None
        bundled = read_key_file(key_file("demo-cp")).key.to_dict()
        assert store.active_model_key("demo-cp").material != bundled  # re-keyed: the public key is retired


def test_the_readme_gives_each_demo_models_command():
    readme = (zoo_dir() / "README.md").read_text()
    for name in DEMO_MODELS:
        assert f"models/zoo/{name}" in readme
