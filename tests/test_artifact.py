"""Model artifacts: manifest.json + weights.safetensors, checked on load, never holding key material."""

import importlib.metadata
import json
import re
import struct
from datetime import UTC, datetime

import pytest
import torch

from seglock.models import ArtifactError, build_model, load_artifact, protect, read_manifest, save_artifact
from seglock.models.artifact import Manifest
from seglock.models.protect import apply_key

CLASSES = ["background", "road", "car"]


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("tiny", len(CLASSES), width=8).eval()


def _save(model, out_dir, **fields):
    defaults = {"name": "streets", "class_names": CLASSES, "input_size": [64, 64]}
    return save_artifact(model, out_dir, **{**defaults, **fields})


def _edit_manifest(path, edit):
    manifest_path = path / "manifest.json"
    data = json.loads(manifest_path.read_text())
    edit(data)
    manifest_path.write_text(json.dumps(data))


@pytest.fixture
def artifact(tmp_path):
    model = _tiny()
    out = tmp_path / "streets"
    _save(model, out)
    return model, out


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def test_round_trip_gives_identical_logits(artifact):
    model, out = artifact
    loaded, _ = load_artifact(out)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_loaded_model_is_in_eval_mode(artifact):
    loaded, _ = load_artifact(artifact[1])
    assert not loaded.training


def test_round_trip_keeps_the_manifest(tmp_path):
    saved = _save(_tiny(), tmp_path / "a", key={"id": "streets", "version": 2},
                  protection={"mode": "shf", "block_size": 4})
    assert load_artifact(tmp_path / "a")[1] == saved


def test_artifact_holds_exactly_a_manifest_and_safetensors_weights(artifact):
    out = artifact[1]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "weights.safetensors"]
    data = (out / "weights.safetensors").read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    assert data[8:9] == b"{" and json.loads(data[8 : 8 + header_length])  # a safetensors header, not a pickle


def test_manifest_layout(tmp_path):
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    _save(_tiny(), tmp_path / "a", created=created, protection={"mode": "cp", "tap": "dec2"},
          key={"id": "k1", "version": 1})
    data = json.loads((tmp_path / "a" / "manifest.json").read_text())
    weights = data.pop("weights")
    assert data == {
        "format_version": 1,
        "name": "streets",
        "architecture": {"name": "tiny", "kwargs": {"width": 8, "in_channels": 3}},
        "num_classes": 3,
        "class_names": CLASSES,
        "input_size": [64, 64],
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "protection": {"mode": "cp", "tap": "dec2", "channels": 8},
        "key": {"id": "k1", "version": 1},
        "created": "2025-01-02T03:04:05+00:00",
        "seglock_version": importlib.metadata.version("seglock"),
    }
    assert weights["file"] == "weights.safetensors"
    assert weights["bytes"] == (tmp_path / "a" / "weights.safetensors").stat().st_size


def test_manifest_round_trips_through_a_dict(artifact):
    manifest = read_manifest(artifact[1])
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_a_flipped_byte_in_the_weights_is_refused(artifact):
    path = artifact[1] / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    message = (
        f"weights.safetensors of {artifact[1]} does not match its manifest's SHA-256: "
        "the artifact is corrupt or was altered"
    )
    with pytest.raises(ArtifactError, match=re.escape(message)):
        load_artifact(artifact[1])


def test_an_edited_class_count_is_refused(artifact):
    def more_classes(data):
        data["num_classes"] = 4
        data["class_names"].append("person")

    _edit_manifest(artifact[1], more_classes)
    with pytest.raises(ArtifactError, match="says num_classes 4 but its weights were saved for 3"):
        load_artifact(artifact[1])


def test_an_edited_architecture_argument_is_refused(artifact):
    _edit_manifest(artifact[1], lambda data: data["architecture"]["kwargs"].update(width=16))
    with pytest.raises(ArtifactError, match="says architecture_kwargs .* but its weights were saved for"):
        load_artifact(artifact[1])


def test_class_names_that_disagree_with_the_class_count_are_refused(artifact):
    _edit_manifest(artifact[1], lambda data: data["class_names"].pop())
    with pytest.raises(ArtifactError, match="class_names must be 3 non-empty strings, got 2"):
        load_artifact(artifact[1])


def test_an_unknown_architecture_is_refused(artifact):
    _edit_manifest(artifact[1], lambda data: data["architecture"].update(name="unet"))
    with pytest.raises(ArtifactError, match="names unknown architecture 'unet'; known: "):
        load_artifact(artifact[1])


def test_another_format_version_is_refused(artifact):
    _edit_manifest(artifact[1], lambda data: data.update(format_version=2))
    with pytest.raises(ArtifactError, match="format_version 2 is not supported"):
        load_artifact(artifact[1])


def test_a_missing_manifest_field_is_refused(artifact):
    _edit_manifest(artifact[1], lambda data: data.pop("normalization"))
    with pytest.raises(ArtifactError, match=r"fields missing: \['normalization'\]"):
        load_artifact(artifact[1])


def test_a_missing_weights_file_is_refused(artifact):
    (artifact[1] / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match=f"{artifact[1]} has no weights.safetensors"):
        load_artifact(artifact[1])


def test_a_missing_manifest_is_refused(artifact):
    (artifact[1] / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=f"{artifact[1]} has no manifest.json"):
        load_artifact(artifact[1])


def test_a_weights_file_outside_the_artifact_is_refused(artifact):
    _edit_manifest(artifact[1], lambda data: data["weights"].update(file="../other/weights.safetensors"))
    with pytest.raises(ArtifactError, match="weights file must be a plain file name"):
        load_artifact(artifact[1])


def test_manifest_of_a_protected_model_holds_no_key_material(tmp_path):
    model = _tiny()
    key = protect(model, "enc3")
    _save(model, tmp_path / "a", protection={"mode": "cp", "tap": "enc3"}, key={"id": "streets", "version": 1})
    text = (tmp_path / "a" / "manifest.json").read_text()
    assert json.dumps(key.perm.tolist()) not in text
    assert str(key.perm.tolist())[1:-1] not in text
    assert "perm" not in text


def test_a_protected_artifact_still_needs_its_key(tmp_path):
    model = _tiny()
    key = protect(model, "enc3")
    _save(model, tmp_path / "a", protection={"mode": "cp", "tap": "enc3"})
    loaded, manifest = load_artifact(tmp_path / "a")
    x = torch.randn(1, 3, 64, 64)
    keyed = apply_key(loaded, manifest.protection["tap"], key)
    assert torch.equal(_logits(keyed, x), _logits(apply_key(model, "enc3", key), x))


@pytest.mark.parametrize(
    "protection",
    [
        {"mode": "cp", "tap": "enc3", "perm": [1, 0]},
        {"mode": "shf", "block_size": 4, "password": "password"},
        {"mode": "ffx", "block_size": 4, "seed": 7},
        {"mode": "cp", "tap": "enc3", "order": list(range(32))},
    ],
    ids=["perm", "password", "seed", "long-integer-list"],
)
def test_save_refuses_key_material_and_writes_nothing(tmp_path, protection):
    with pytest.raises(ArtifactError, match="looks like key material"):
        _save(_tiny(), tmp_path / "a", protection=protection)
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_manifest_edited_to_hold_key_material(artifact):
    _edit_manifest(artifact[1], lambda data: data["protection"].update(secret="x"))
    with pytest.raises(ArtifactError, match="'protection.secret' looks like key material"):
        load_artifact(artifact[1])


def test_a_key_reference_holds_only_id_and_version(artifact):
    _edit_manifest(artifact[1], lambda data: data.update(key={"id": "a", "version": 1, "value": "x"}))
    with pytest.raises(ArtifactError, match=r"'key' must be null or \{id, version\}"):
        load_artifact(artifact[1])


def test_save_refuses_an_unknown_cp_tap(tmp_path):
    with pytest.raises(ArtifactError, match="tiny has no tap 'layer4'"):
        _save(_tiny(), tmp_path / "a", protection={"mode": "cp", "tap": "layer4"})


def test_save_refuses_an_unknown_protection_mode(tmp_path):
    with pytest.raises(ArtifactError, match="protection mode must be one of none, cp, shf, np, ffx, per-image"):
        _save(_tiny(), tmp_path / "a", protection={"mode": "rot13"})


def test_per_image_mode_needs_its_sub_block(tmp_path):
    with pytest.raises(ArtifactError, match="'per-image' needs 'sub_block'"):
        _save(_tiny(), tmp_path / "a", protection={"mode": "per-image", "block_size": 16})


def test_a_keyless_mode_names_no_key(tmp_path):
    with pytest.raises(ArtifactError, match="mode 'none' has no key to name"):
        _save(_tiny(), tmp_path / "a", key={"id": "streets", "version": 1})


def test_save_refuses_a_class_list_of_the_wrong_length(tmp_path):
    with pytest.raises(ArtifactError, match="class_names must be 3 non-empty strings, got 2"):
        _save(_tiny(), tmp_path / "a", class_names=["a", "b"])


def test_save_refuses_an_input_size_the_vit_was_not_built_for(tmp_path):
    model = build_model("vit_seg", 3, image_size=[32, 32], embed_dim=32, depth=1, num_heads=2, head_channels=32)
    with pytest.raises(ArtifactError, match=r"vit_seg was built for \[32, 32\] inputs, not \[64, 64\]"):
        _save(model, tmp_path / "a")


def test_save_refuses_a_keyed_wrapper(tmp_path):
    model = _tiny()
    keyed = apply_key(model, "enc1", protect(model, "enc1"))
    with pytest.raises(ArtifactError, match="save the model built by models.build_model"):
        _save(keyed, tmp_path / "a")


def test_save_refuses_to_replace_an_artifact_unless_told(artifact):
    with pytest.raises(ArtifactError, match="already exists; pass overwrite=True"):
        _save(_tiny(), artifact[1])


def test_save_with_overwrite_replaces_the_artifact_and_leaves_no_temp_files(artifact):
    model, out = artifact
    protect(model, "dec1")
    manifest = _save(model, out, overwrite=True, protection={"mode": "cp", "tap": "dec1"})
    assert read_manifest(out) == manifest
    assert sorted(p.name for p in out.parent.iterdir()) == ["streets"]


def test_a_save_failing_while_writing_leaves_nothing_behind(tmp_path):
    with torch.device("meta"):
        model = build_model("tiny", len(CLASSES))  # weights that cannot be copied out: writing fails midway
    with pytest.raises((NotImplementedError, RuntimeError)):
        _save(model, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
