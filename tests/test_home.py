"""Home: the on-disk layout of a server home, the revision each model serves (with and without
repair), import, the disk-and-keystore half of cp key rotation, and the training key sink."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from seglock.app.errors import (
    InvalidModelName,
    KeyRequired,
    ModelExists,
    ModelNotFound,
    ModelUnavailable,
    NeedsRetraining,
    NotRotatable,
    ServiceError,
    StaleKeyVersion,
    http_status,
)
from seglock.app.home import Home, HomeKeySink, Rotation, key_material
from seglock.client.modes import Mode
from seglock.client.transforms import BlockKey
from seglock.models import KeyRef, load_artifact, read_manifest, rekey, save_artifact
from seglock.models.inputs import model_input
from seglock.models.protect import CPKey
from tests.server_fixtures import make_artifacts, open_keystore, scene


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture
def home(tmp_path, artifacts):
    """A home with every fixture model imported."""
    home = Home(tmp_path / "home", open_keystore(tmp_path / "home"))
    for _name, (path, key) in artifacts.items():
        home.import_artifact(path, key=key, actor="test")
    return home


def masks(module: torch.nn.Module, manifest, seed: int = 0) -> np.ndarray:
    batch = torch.from_numpy(np.stack([scene(seed + i, 32, 32) for i in range(3)]))
    with torch.inference_mode():
        return module.eval()(model_input(batch, manifest)).argmax(dim=1).numpy()


def states(home: Home, name: str) -> dict[int, str]:
    return {v.version: v.state for v in home.keystore.model_key_versions(name)}


def add_revision(home: Home, name: str, revision: int, key_version: int | None) -> None:
    """Copy r1 of `name` as r<revision>, naming `key_version` (as a cut-off rotation leaves it)."""
    model, manifest = home.load_revision(name, home.revision_dir(name, 1))
    key = None if key_version is None else KeyRef(id=home.keystore.get_model_key(name, key_version).id,
                                                   version=key_version)
    save_artifact(model, home.revision_dir(name, revision), name=name, class_names=list(manifest.class_names),
                  input_size=list(manifest.input_size), normalization=manifest.normalization,
                  protection={k: v for k, v in manifest.protection.items() if k != "channels"}, key=key,
                  seal=home._sealer(name, revision, "test"))


# -- layout ----------------------------------------------------------------------------------------


def test_layout_paths(tmp_path):
    home = Home(tmp_path)
    assert home.path == tmp_path
    assert home.models_dir == tmp_path / "models"
    assert home.model_dir("demo-cp") == tmp_path / "models" / "demo-cp"
    assert home.revision_dir("demo-cp", 3) == tmp_path / "models" / "demo-cp" / "r3"
    assert home.model_lock("demo-cp").lock_file == str(tmp_path / "models" / "demo-cp" / ".rotate.lock")
    assert repr(home) == f"Home({str(tmp_path)!r})"


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a" * 65])
def test_a_name_outside_the_rule_never_becomes_a_path(tmp_path, name):
    home = Home(tmp_path)
    with pytest.raises(InvalidModelName) as caught:
        home.model_dir(name)
    assert str(caught.value).startswith(f"invalid model name {name!r}: use 1-64 characters")
    assert isinstance(caught.value, ValueError)


def test_revisions_are_the_r_n_folders_only(tmp_path):
    home = Home(tmp_path)
    folder = home.model_dir("m")
    for child in ("r1", "r10", "r2", "rx", "r", ".r3.abc.tmp", "R4"):
        (folder / child).mkdir(parents=True)
    (folder / "r5").write_text("a file, not a revision")
    assert home.revisions("m") == {1: folder / "r1", 2: folder / "r2", 10: folder / "r10"}
    assert home.revisions("absent") == {}


def test_model_names_are_the_folders_that_follow_the_name_rule(tmp_path):
    home = Home(tmp_path)
    assert home.model_names() == []
    for child in ("b-model", "a.model", "-bad", ".hidden"):
        (home.models_dir / child).mkdir(parents=True)
    (home.models_dir / "c-file").write_text("")
    assert home.model_names() == ["a.model", "b-model"]


def test_is_taken_by_an_artifact_or_a_key(home):
    assert home.is_taken("cp") and home.is_taken("plain")
    assert not home.is_taken("fresh")
    home.keystore.add_model_key("fresh", "cp", CPKey.generate(4).to_dict())
    assert home.is_taken("fresh")


# -- import ----------------------------------------------------------------------------------------


def test_import_writes_r1_and_rekeys_cp_only(home, artifacts):
    assert home.model_names() == ["cp", "per-image", "plain", "shf"]
    for name in home.model_names():
        assert sorted(home.revisions(name)) == [1]
    cp = read_manifest(home.revision_dir("cp", 1))
    active = home.keystore.active_model_key("cp")
    assert (cp.key.id, cp.key.version) == (active.id, active.version) and active.version == 1
    assert cp.protection == {"mode": "cp", "tap": "dec2", "channels": 8}
    assert home.model_key(cp) != artifacts["cp"][1]  # the bundled (public) key was replaced
    shf = read_manifest(home.revision_dir("shf", 1))
    assert home.model_key(shf) == artifacts["shf"][1]  # an input key stays: clients encrypt with it
    assert states(home, "shf") == {1: "active"}
    for keyless in ("plain", "per-image"):
        assert read_manifest(home.revision_dir(keyless, 1)).key is None
        assert home.keystore.model_key_versions(keyless) == []
    audit = [(e.action, e.target, e.actor) for e in home.keystore.audit_log() if e.target.startswith("cp@")]
    assert audit == [("model_key.add", "cp@v1", "test"), ("model_key.activate", "cp@v1", "test")]


def test_a_cp_import_keeps_the_masks(home, artifacts):
    plain_model, plain_manifest = load_artifact(artifacts["plain"][0])
    module, manifest, block_key = home.serving_module("cp", home.revision_dir("cp", 1))
    assert block_key is None and manifest.mode is Mode.CP
    np.testing.assert_array_equal(masks(module, manifest), masks(plain_model, plain_manifest))


def test_import_refuses_a_taken_name_a_missing_key_and_a_bad_name(home, artifacts):
    with pytest.raises(ModelExists, match=f"^model cp already exists in {home.path}$"):
        home.import_artifact(artifacts["cp"][0], key=artifacts["cp"][1])
    with pytest.raises(KeyRequired, match="^model cp2 is cp-protected: its key file is needed to import it$"):
        home.import_artifact(artifacts["cp"][0], name="cp2")
    with pytest.raises(InvalidModelName, match="invalid model name '../up'"):
        home.import_artifact(artifacts["plain"][0], name="../up")
    assert home.revisions("cp2") == {} and home.keystore.model_key_versions("cp2") == []
    assert sorted(home.revisions("cp")) == [1] and states(home, "cp") == {1: "active"}


def test_import_under_another_name(home, artifacts):
    manifest = home.import_artifact(artifacts["plain"][0], name="plain-copy")
    assert manifest.name == "plain-copy" and manifest.mode is Mode.NONE
    assert read_manifest(home.revision_dir("plain-copy", 1)).name == "plain-copy"


# -- the revision in use -----------------------------------------------------------------------------


def test_a_keyless_model_serves_its_newest_revision(home):
    add_revision(home, "plain", 3, None)
    assert home.serving_revision("plain") == home.revision_dir("plain", 3)
    assert sorted(home.revisions("plain")) == [1, 3]  # without repair nothing moves
    assert home.serving_revision("plain", repair=True) == home.revision_dir("plain", 3)
    assert sorted(home.revisions("plain")) == [3]


def test_a_keyed_model_serves_the_revision_of_its_active_key(home):
    # a rotation cut off after writing r2 and its pending key: r1 still holds the active key
    pending = home.keystore.add_model_key("cp", *key_material(Mode.CP, CPKey.generate(8)), activate=False)
    add_revision(home, "cp", 2, pending.version)
    assert home.serving_revision("cp") == home.revision_dir("cp", 1)
    assert Home(home.path).serving_revision("cp") == home.revision_dir("cp", 2)  # no keystore: the newest
    assert sorted(home.revisions("cp")) == [1, 2] and states(home, "cp") == {1: "active", 2: "pending"}

    assert home.serving_revision("cp", repair=True) == home.revision_dir("cp", 1)
    assert sorted(home.revisions("cp")) == [1]
    assert states(home, "cp") == {1: "active", 2: "destroyed"}


def test_repair_after_the_commit_keeps_the_new_pair(home):
    pending = home.keystore.add_model_key("cp", *key_material(Mode.CP, CPKey.generate(8)), activate=False)
    add_revision(home, "cp", 2, pending.version)
    home.keystore.set_active("cp", pending.version)
    assert home.serving_revision("cp") == home.revision_dir("cp", 2)
    assert home.serving_revision("cp", repair=True) == home.revision_dir("cp", 2)
    assert sorted(home.revisions("cp")) == [2] and states(home, "cp") == {1: "destroyed", 2: "active"}


def test_revision_for_key(home):
    assert home.revision_for_key("cp", 1) == (1, home.revision_dir("cp", 1))
    assert home.revision_for_key("cp", 7) is None
    assert home.revision_for_key("plain", 1) is None


def test_no_servable_revision_is_a_domain_error(home, tmp_path):
    with pytest.raises(ModelNotFound, match=f"^{home.path} has no model 'ghost'$"):
        home.serving_revision("ghost")
    with pytest.raises(ModelNotFound):
        home.serving_revision("ghost", repair=True)
    elsewhere = Home(home.path, open_keystore(tmp_path / "another-keystore"))
    with pytest.raises(ModelUnavailable, match="^model cp has no active key in the keystore$"):
        elsewhere.serving_revision("cp")
    other = home.keystore.add_model_key("cp", *key_material(Mode.CP, CPKey.generate(8)))
    with pytest.raises(ModelUnavailable,
                       match=f"^no artifact of model cp matches its active key version {other.version}$"):
        home.serving_revision("cp", repair=True)
    assert sorted(home.revisions("cp")) == [1]  # nothing removed when nothing fits


def test_model_key_refuses_a_key_that_is_not_the_one_named(home):
    manifest = read_manifest(home.revision_dir("cp", 1))
    with pytest.raises(ModelUnavailable, match=r"has no key cp v9$"):
        home.model_key(dataclasses.replace(manifest, key=KeyRef(id=manifest.key.id, version=9)))
    with pytest.raises(ModelUnavailable, match=r"holds another key as cp v1 \(id "):
        home.model_key(dataclasses.replace(manifest, key=KeyRef(id="k-other", version=1)))
    home.keystore.add_model_key("cp", *key_material(Mode.CP, CPKey.generate(8)))  # v2, active
    home.keystore.destroy_model_key("cp", 1)
    with pytest.raises(ModelUnavailable, match=f"^key cp v1 in {home.path} was destroyed$"):
        home.model_key(manifest)
    assert home.model_key(read_manifest(home.revision_dir("plain", 1))) is None


# -- rotation --------------------------------------------------------------------------------------


def test_rotation_moves_disk_and_keystore_to_a_new_pair_with_the_same_masks(home):
    before = masks(*home.serving_module("cp", home.revision_dir("cp", 1))[:2])
    seen = []

    def on_commit(rotation: Rotation, module: torch.nn.Module) -> None:
        # committed: the keystore names the new key, both revisions are still on disk
        seen.append((rotation, sorted(home.revisions("cp")), states(home, "cp")))
        np.testing.assert_array_equal(masks(module, rotation.manifest), before)

    rotation = home.rotate_key("cp", on_commit)
    assert rotation == Rotation("cp", 1, 2, 2, read_manifest(home.revision_dir("cp", 2)))
    assert rotation.summary() == {"model": "cp", "previous_key_version": 1, "key_version": 2}
    assert seen == [(rotation, [1, 2], {1: "retiring", 2: "active"})]
    assert sorted(home.revisions("cp")) == [2]
    assert states(home, "cp") == {1: "destroyed", 2: "active"}
    assert rotation.manifest.key.version == 2 and rotation.manifest.key.id == home.keystore.active_model_key("cp").id
    after = masks(*home.serving_module("cp", home.revision_dir("cp", 2))[:2])
    np.testing.assert_array_equal(after, before)
    audit = [(e.action, e.target, e.actor) for e in home.keystore.audit_log()][-4:]
    assert audit == [("model_key.add", "cp@v2", "rotate:cp"), ("model_key.retire", "cp@v1", "rotate:cp"),
                     ("model_key.activate", "cp@v2", "rotate:cp"), ("model_key.destroy", "cp@v1", "rotate:cp")]


def test_a_second_rotation_without_a_callback(home):
    home.rotate_key("cp")
    rotation = home.rotate_key("cp")
    assert (rotation.previous_key_version, rotation.key_version, rotation.revision) == (2, 3, 3)
    assert sorted(home.revisions("cp")) == [3]
    assert states(home, "cp") == {1: "destroyed", 2: "destroyed", 3: "active"}


def test_rotation_first_repairs_a_rotation_that_was_cut_off(home):
    model, manifest = home.load_revision("cp", home.revision_dir("cp", 1))
    new_key = rekey(model, "dec2", home.model_key(manifest))
    pending = home.keystore.add_model_key("cp", *key_material(Mode.CP, new_key), activate=False)
    add_revision(home, "cp", 2, pending.version)
    rotation = home.rotate_key("cp")
    # the cut-off r2 was removed first, so the new pair takes its folder name with the next key version
    assert (rotation.previous_key_version, rotation.key_version, rotation.revision) == (1, 3, 2)
    assert sorted(home.revisions("cp")) == [2]
    assert read_manifest(home.revision_dir("cp", 2)).key.version == 3
    assert states(home, "cp") == {1: "destroyed", 2: "destroyed", 3: "active"}


@pytest.mark.parametrize("name, error, message", [
    ("shf", NeedsRetraining, "model shf is shf-protected: a new input key needs re-training"),
    ("plain", NotRotatable, "model plain (none) has no key to rotate"),
    ("per-image", NotRotatable, "model per-image (per-image) has no key to rotate"),
])
def test_only_cp_keys_rotate(home, name, error, message):
    before = {n: (sorted(home.revisions(n)), states(home, n)) for n in home.model_names()}
    with pytest.raises(error) as caught:
        home.rotate_key(name)
    assert str(caught.value) == message
    assert {n: (sorted(home.revisions(n)), states(home, n)) for n in home.model_names()} == before


def test_rotating_an_unknown_model(home):
    with pytest.raises(ModelNotFound, match=f"^{home.path} has no model 'ghost'$"):
        home.rotate_key("ghost")
    assert not home.model_dir("ghost").exists()


def test_a_home_without_its_keystore_cannot_change_keys(tmp_path, artifacts):
    bare = Home(tmp_path)
    with pytest.raises(TypeError, match="opened without its keystore"):
        bare.import_artifact(artifacts["plain"][0])
    assert not bare.models_dir.exists()


# -- the training key sink ---------------------------------------------------------------------------


def test_key_sink_stores_an_active_key_and_refuses_taken_names(tmp_path, monkeypatch):
    from tests.server_fixtures import MASTER_KEY

    monkeypatch.setenv("SEGLOCK_MASTER_KEY", MASTER_KEY)
    sink = Home(tmp_path / "home").key_sink()
    assert isinstance(sink, HomeKeySink) and sink.home == tmp_path / "home"
    sink.check("fresh")
    block = BlockKey.generate("np", 4)
    ref = sink.store("fresh", block)
    assert ref.version == 1 and len(ref.id) == 13 and ref.id.startswith("k")
    store = open_keystore(tmp_path / "home")
    stored = store.active_model_key("fresh")
    assert (stored.version, stored.id, stored.kind) == (1, ref.id, "block")
    assert BlockKey.from_dict(stored.material) == block
    with pytest.raises(ValueError, match="already has a model named 'fresh': choose another name"):
        sink.check("fresh")
    ref = sink.store("cp-model", CPKey.generate(8))
    assert open_keystore(tmp_path / "home").active_model_key("cp-model").kind == "cp"


# -- errors ------------------------------------------------------------------------------------------


def test_each_domain_error_maps_to_one_http_answer():
    expected = {
        InvalidModelName: (400, "bad_request"), KeyRequired: (400, "bad_request"),
        NotRotatable: (400, "bad_request"), ModelNotFound: (404, "not_found"),
        ModelExists: (409, "conflict"), NeedsRetraining: (409, "conflict"),
        StaleKeyVersion: (409, "conflict"), ModelUnavailable: (503, "unavailable"),
    }
    assert set(ServiceError.__subclasses__()) == set(expected)
    for cls, answer in expected.items():
        assert http_status(cls("x")) == answer
    assert http_status(ServiceError("x")) == (400, "bad_request")
