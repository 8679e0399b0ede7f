"""`seglock models protect|list|import|rotate-key`: exact protection and key rotation, offline."""

import json
import os
import stat

import pytest
import torch

from seglock.app.cli import main
from seglock.app.home import Home, key_from_material
from seglock.keystore import Keystore
from seglock.models import build_model, fold_key, load_artifact, read_manifest, save_artifact
from seglock.models.data import open_dataset, write_synth_dataset
from seglock.models.evaluate import evaluate_conditions
from seglock.models.inputs import model_input
from seglock.models.keyfile import read_key_file
from seglock.models.zoo import zoo_dir

PLAIN = zoo_dir() / "demo-plain"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_synth_dataset(root, 10, seed=4, size=128, val_fraction=0.6)
    return root


@pytest.fixture(scope="module")
def images(scenes):
    data = open_dataset(scenes, "val", size=128)
    return torch.stack([data[i][0] for i in range(len(data))])


@pytest.fixture(scope="module")
def plain_masks(images):
    model, manifest = load_artifact(PLAIN)
    with torch.no_grad():
        return model(model_input(images, manifest)).argmax(1)


def _masks(module, manifest, images):
    with torch.no_grad():
        return module(model_input(images, manifest)).argmax(1)


def _one_line_error(capsys, code, message):
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and err.startswith("seglock: error: ")


def test_protect_writes_a_cp_artifact_and_a_0600_key_file(tmp_path, capsys):
    code = main(["models", "protect", "--model", str(PLAIN), "--tap", "dec1", "--out", str(tmp_path / "cp"),
                 "--key-out", str(tmp_path / "cp.json"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "cp" and result["channels"] == 64 and result["protect_seconds"] >= 0
    manifest = read_manifest(tmp_path / "cp")
    assert manifest.protection == {"mode": "cp", "tap": "dec1", "channels": 64}
    assert stat.S_IMODE(os.stat(tmp_path / "cp.json").st_mode) == 0o600
    assert read_key_file(tmp_path / "cp.json").model == "cp"
    assert "perm" not in (tmp_path / "cp" / "manifest.json").read_text()


def test_protect_prints_the_seconds_it_took(tmp_path, capsys):
    assert main(["models", "protect", "--model", str(PLAIN), "--tap", "enc2", "--out", str(tmp_path / "cp"),
                 "--key-out", str(tmp_path / "k.json")]) == 0
    out = capsys.readouterr().out
    assert "protected demo-plain at tap enc2 (64 channels" in out and " s " in out


def test_protected_model_with_its_key_gives_exactly_the_plain_masks(tmp_path, images, plain_masks):
    assert main(["models", "protect", "--model", str(PLAIN), "--tap", "dec1", "--out", str(tmp_path / "cp"),
                 "--key-out", str(tmp_path / "k.json")]) == 0
    model, manifest = load_artifact(tmp_path / "cp")
    key = read_key_file(tmp_path / "k.json").key
    folded = fold_key(model, "dec1", key)
    plain, _ = load_artifact(PLAIN)
    for (name, a), (_, b) in zip(folded.state_dict().items(), plain.state_dict().items(), strict=False):
        assert torch.equal(a, b), name
    assert torch.equal(_masks(folded, manifest, images), plain_masks)
    assert not torch.equal(_masks(model, manifest, images), plain_masks)


def test_protect_keeps_miou_exactly(tmp_path, scenes):
    assert main(["models", "protect", "--model", str(PLAIN), "--tap", "enc3", "--out", str(tmp_path / "cp"),
                 "--key-out", str(tmp_path / "k.json")]) == 0
    key = read_key_file(tmp_path / "k.json").key
    before = evaluate_conditions(PLAIN, scenes, key=None, conditions="correct", progress=False)["conditions"]
    after = evaluate_conditions(tmp_path / "cp", scenes, key=key, conditions="correct", progress=False)["conditions"]
    for metric in ("aAcc", "mIoU", "mAcc", "IoU", "Acc"):
        assert after["correct"][metric] == before["correct"][metric]


def test_import_list_rotate_round_trip_keeps_the_masks(tmp_path, images, plain_masks, capsys):
    home = tmp_path / "home"
    assert main(["models", "protect", "--model", str(PLAIN), "--tap", "dec1", "--out", str(tmp_path / "cp"),
                 "--key-out", str(tmp_path / "k.json"), "--name", "streets"]) == 0
    capsys.readouterr()
    assert main(["models", "import", "--home", str(home), "--model", str(tmp_path / "cp"),
                 "--key-file", str(tmp_path / "k.json"), "--json"]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["model"] == "streets" and imported["rekeyed"] is True

    def served():
        with Keystore.open(home) as store:
            [path] = Home(home).revisions("streets").values()
            model, manifest = Home(home, store).load_revision("streets", path)  # decrypted in memory
            key = key_from_material("cp", store.get_model_key("streets", manifest.key.version).material)
        return _masks(fold_key(model, "dec1", key), manifest, images), manifest, key

    masks, manifest, key = served()
    assert torch.equal(masks, plain_masks)
    assert key != read_key_file(tmp_path / "k.json").key  # the imported key was replaced

    assert main(["models", "list", "--home", str(home), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["name"], row["revision"], row["key"]["version"]) == ("streets", 1, manifest.key.version)

    assert main(["models", "rotate-key", "--home", str(home), "--model", "streets", "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["previous_key_version"] == manifest.key.version
    assert rotated["key_version"] == manifest.key.version + 1
    masks_after, manifest_after, key_after = served()
    assert torch.equal(masks_after, plain_masks) and key_after != key
    assert sorted(Home(home).revisions("streets")) == [2]
    with Keystore.open(home) as store:
        old = store.get_model_key("streets", manifest.key.version)
    assert old.state == "destroyed" and old.material is None

    assert main(["models", "list", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "streets" in out and f"v{rotated['key_version']}" in out and "r2" in out


def test_import_takes_a_key_trained_into_the_same_home(tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["models", "protect", "--model", str(PLAIN), "--tap", "enc1", "--out", str(tmp_path / "x"),
                 "--home", str(home)]) == 0
    assert main(["models", "import", "--home", str(home), "--model", str(tmp_path / "x")]) == 0
    assert "imported" in capsys.readouterr().out
    assert sorted(Home(home).revisions("x")) == [1]


def test_list_reads_artifact_folders(tmp_path, capsys):
    assert main(["models", "list", str(PLAIN), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "demo-plain" and row["protection"] == {"mode": "none"} and row["revision"] is None


def test_protect_of_a_model_already_protected_is_refused(tmp_path, capsys):
    main(["models", "protect", "--model", str(PLAIN), "--tap", "dec1", "--out", str(tmp_path / "cp"),
          "--key-out", str(tmp_path / "k.json")])
    capsys.readouterr()
    code = main(["models", "protect", "--model", str(tmp_path / "cp"), "--tap", "dec1",
                 "--out", str(tmp_path / "again"), "--key-out", str(tmp_path / "k2.json")])
    _one_line_error(capsys, code, "takes a plain (none) model; to change a cp model's key use rotate-key")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tap", "nope"], "has no tap 'nope'"),
        (["--tap", "dec1", "--name", "../up"], "invalid model name"),
    ],
)
def test_protect_bad_inputs_exit_2(tmp_path, capsys, extra, message):
    code = main(["models", "protect", "--model", str(PLAIN), "--out", str(tmp_path / "o"),
                 "--key-out", str(tmp_path / "k.json"), *extra])
    _one_line_error(capsys, code, message)
    assert not (tmp_path / "k.json").exists()


def test_protect_refuses_to_overwrite_a_key_file(tmp_path, capsys):
    (tmp_path / "k.json").write_text("{}")
    code = main(["models", "protect", "--model", str(PLAIN), "--tap", "dec1", "--out", str(tmp_path / "o"),
                 "--key-out", str(tmp_path / "k.json")])
    _one_line_error(capsys, code, "already exists")
    assert (tmp_path / "k.json").read_text() == "{}"


def test_protect_of_a_missing_artifact_exits_2(tmp_path, capsys):
    code = main(["models", "protect", "--model", str(tmp_path / "none"), "--tap", "dec1",
                 "--out", str(tmp_path / "o"), "--key-out", str(tmp_path / "k.json")])
    _one_line_error(capsys, code, "is not a model artifact directory")


def test_import_of_a_cp_model_without_its_key_exits_2(tmp_path, capsys):
    main(["models", "protect", "--model", str(PLAIN), "--tap", "dec1", "--out", str(tmp_path / "cp"),
          "--key-out", str(tmp_path / "k.json")])
    capsys.readouterr()
    code = main(["models", "import", "--home", str(tmp_path / "home"), "--model", str(tmp_path / "cp")])
    _one_line_error(capsys, code, "give its --key-file")


def test_import_with_another_models_key_file_exits_2(tmp_path, capsys):
    main(["models", "protect", "--model", str(PLAIN), "--tap", "dec1", "--out", str(tmp_path / "a"),
          "--key-out", str(tmp_path / "a.json")])
    main(["models", "protect", "--model", str(PLAIN), "--tap", "dec1", "--out", str(tmp_path / "b"),
          "--key-out", str(tmp_path / "b.json")])
    capsys.readouterr()
    code = main(["models", "import", "--home", str(tmp_path / "home"), "--model", str(tmp_path / "a"),
                 "--key-file", str(tmp_path / "b.json")])
    _one_line_error(capsys, code, "is for model 'b', not 'a'")


def test_import_twice_exits_2(tmp_path, capsys):
    home = str(tmp_path / "home")
    assert main(["models", "import", "--home", home, "--model", str(PLAIN)]) == 0
    capsys.readouterr()
    code = main(["models", "import", "--home", home, "--model", str(PLAIN)])
    _one_line_error(capsys, code, "already exists")


def test_rotate_key_of_an_unknown_or_keyless_model_exits_2(tmp_path, capsys):
    home = str(tmp_path / "home")
    assert main(["models", "import", "--home", home, "--model", str(PLAIN)]) == 0
    capsys.readouterr()
    _one_line_error(capsys, main(["models", "rotate-key", "--home", home, "--model", "ghost"]), "ghost")
    _one_line_error(capsys, main(["models", "rotate-key", "--home", home, "--model", "demo-plain"]),
                    "has no key to rotate")
    _one_line_error(capsys, main(["models", "rotate-key", "--home", home, "--model", "../x"]), "invalid model name")


def test_list_of_a_folder_that_is_no_home_exits_2(tmp_path, capsys):
    _one_line_error(capsys, main(["models", "list", "--home", str(tmp_path)]), "is not a seglock home")


def test_protect_works_on_any_plain_artifact(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", 3, width=4)
    save_artifact(model, tmp_path / "p", name="p", class_names=["a", "b", "c"], input_size=[32, 32])
    assert main(["models", "protect", "--model", str(tmp_path / "p"), "--tap", "dec2", "--out", str(tmp_path / "c"),
                 "--key-out", str(tmp_path / "k.json")]) == 0
    assert read_manifest(tmp_path / "c").protection["channels"] == 4
