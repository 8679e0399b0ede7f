"""Evaluation under access-control conditions: the metrics module's numbers on the same predictions."""

import json

import numpy as np
import pytest
import torch

from seglock.app.cli import main
from seglock.client.transforms import BlockKey, encrypt_blocks
from seglock.keystore import Keystore
from seglock.models import KeyRef, build_model, fold_key, load_artifact, protect, save_artifact
from seglock.models.data import open_dataset, write_synth_dataset
from seglock.models.evaluate import (
    EvaluateError,
    evaluate_conditions,
    evaluate_model,
    parse_conditions,
    summarize,
    wrong_keys,
)
from seglock.models.inputs import model_input
from seglock.models.keyfile import write_key_file
from seglock.models.metrics import confusion_matrix, segmentation_metrics
from seglock.models.protect import CPKey
from seglock.models.zoo import zoo_dir

CENTRED = {"mean": [0.5] * 3, "std": [0.5] * 3}
METRICS = ("aAcc", "mIoU", "mAcc", "IoU", "Acc", "pixels")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Held-out scenes for the demo models (they were trained on seed 1)."""
    root = tmp_path_factory.mktemp("scenes")
    write_synth_dataset(root, 10, seed=2, size=128, val_fraction=0.8)
    return root


@pytest.fixture(scope="module")
def batch(scenes):
    data = open_dataset(scenes, "val", size=128)
    images, masks = zip(*(data[i] for i in range(len(data))), strict=False)
    return torch.stack(images), torch.stack(masks)


@pytest.fixture(scope="module")
def cp_demo(tmp_path_factory):
    """demo-plain protected post hoc at dec1 with a known key."""
    folder = tmp_path_factory.mktemp("cp")
    model, manifest = load_artifact(zoo_dir() / "demo-plain")
    key = protect(model, "dec1")
    save_artifact(model, folder / "m", name="cp", class_names=list(manifest.class_names),
                  input_size=list(manifest.input_size), normalization=manifest.normalization,
                  protection={"mode": "cp", "tap": "dec1"}, key=KeyRef("k1", 1))
    write_key_file(folder / "m.json", key, model="cp")
    return folder / "m", key


@pytest.fixture(scope="module")
def shf_random(tmp_path_factory):
    """A random-init shf model: enough for exact bookkeeping checks."""
    folder = tmp_path_factory.mktemp("shf")
    torch.manual_seed(0)
    model = build_model("tiny", 6, width=8)
    save_artifact(model, folder / "m", name="shf", class_names=[f"c{i}" for i in range(6)], input_size=[128, 128],
                  normalization=CENTRED, protection={"mode": "shf", "block_size": 4}, key=KeyRef("k2", 1))
    return folder / "m", BlockKey.generate("shf", 4)


def _metrics(pred, target, k=6):
    return segmentation_metrics(confusion_matrix(pred, target, k))


def _same(scores, expected):
    for name in METRICS:
        assert scores[name] == expected[name], name


def test_correct_cp_metrics_are_the_metrics_module_on_the_folded_models_predictions(cp_demo, batch, scenes):
    path, key = cp_demo
    model, manifest = load_artifact(path)
    images, masks = batch
    with torch.no_grad():
        pred = fold_key(model, "dec1", key)(model_input(images, manifest)).argmax(1)
    scores = evaluate_model(model, manifest, open_dataset(scenes, "val", size=128), condition="correct", key=key,
                            batch_size=5)
    _same(scores, _metrics(pred, masks))
    assert scores["images"] == 8
    assert scores["per_class"]["background"]["IoU"] == scores["IoU"][0]


def test_plain_cp_condition_runs_the_stolen_weights_as_they_are(cp_demo, batch, scenes):
    path, _ = cp_demo
    model, manifest = load_artifact(path)
    images, masks = batch
    with torch.no_grad():
        pred = model(model_input(images, manifest)).argmax(1)
    scores = evaluate_model(model, manifest, open_dataset(scenes, "val", size=128), condition="plain")
    _same(scores, _metrics(pred, masks))


def test_correct_block_condition_feeds_the_sdks_encryption(shf_random, batch, scenes):
    path, key = shf_random
    model, manifest = load_artifact(path)
    images, masks = batch
    encrypted = torch.from_numpy(encrypt_blocks(images.numpy(), key))
    with torch.no_grad():
        pred = model(model_input(encrypted, manifest)).argmax(1)
    scores = evaluate_model(model, manifest, open_dataset(scenes, "val", size=128), condition="correct", key=key)
    _same(scores, _metrics(pred, masks))


def test_plain_block_condition_feeds_unencrypted_images(shf_random, batch, scenes):
    path, _ = shf_random
    model, manifest = load_artifact(path)
    images, masks = batch
    with torch.no_grad():
        pred = model(model_input(images, manifest)).argmax(1)
    scores = evaluate_model(model, manifest, open_dataset(scenes, "val", size=128), condition="plain")
    _same(scores, _metrics(pred, masks))


def test_post_hoc_protection_keeps_every_metric_exactly(cp_demo, scenes):
    path, key = cp_demo
    plain = evaluate_conditions(zoo_dir() / "demo-plain", scenes, key=None, conditions="correct", progress=False)
    cp = evaluate_conditions(path, scenes, key=key, conditions="correct", progress=False)
    _same(cp["conditions"]["correct"], plain["conditions"]["correct"])


def test_wrong_keys_and_no_key_lower_miou(cp_demo, scenes):
    path, key = cp_demo
    result = evaluate_conditions(path, scenes, key=key, conditions="correct,plain,random:5", progress=False)
    correct = result["conditions"]["correct"]["mIoU"]
    assert result["conditions"]["plain"]["mIoU"] < correct - 10
    assert result["conditions"]["random:5"]["mIoU"]["max"] < correct - 10


def test_random_summary_is_the_statistics_of_its_values(cp_demo, scenes):
    path, key = cp_demo
    first = evaluate_conditions(path, scenes, key=key, conditions="random:3", seed=7, progress=False)
    again = evaluate_conditions(path, scenes, key=key, conditions="random:3", seed=7, progress=False)
    summary = first["conditions"]["random:3"]
    assert summary["n"] == 3 and len(summary["mIoU"]["values"]) == 3
    assert summary["mIoU"] == summarize(summary["mIoU"]["values"])
    assert summary["mIoU"]["mean"] == float(np.mean(summary["mIoU"]["values"]))
    stats = summary["mIoU"]
    assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
    assert again["conditions"] == first["conditions"]


def test_summarize_uses_linear_quartiles():
    assert summarize([1.0, 2.0, 3.0, 4.0, 5.0]) == {
        "mean": 3.0, "min": 1.0, "q1": 2.0, "median": 3.0, "q3": 4.0, "max": 5.0, "values": [1.0, 2.0, 3.0, 4.0, 5.0]}


def test_wrong_keys_are_of_the_models_kind_and_never_its_key(cp_demo, shf_random):
    _, cp_manifest = load_artifact(cp_demo[0])
    keys = wrong_keys(cp_manifest, 20, key=cp_demo[1], seed=1)
    assert all(isinstance(k, CPKey) and k.channels == 64 and k != cp_demo[1] for k in keys)
    assert len({tuple(k.perm) for k in keys}) == 20
    _, shf_manifest = load_artifact(shf_random[0])
    blocks = wrong_keys(shf_manifest, 3, key=shf_random[1], seed=1)
    assert all(k.method == "shf" and k.block_size == 4 and k != shf_random[1] for k in blocks)
    assert wrong_keys(shf_manifest, 3, seed=1) == blocks


def test_keyless_models_have_no_random_condition(scenes):
    result = evaluate_conditions(zoo_dir() / "demo-plain", scenes, key=None, conditions="correct,plain,random:3",
                                 progress=False)
    assert result["conditions"]["random:3"] == {"applicable": False, "reason": "none models have no key to guess"}
    _same(result["conditions"]["plain"], result["conditions"]["correct"])


def test_per_image_correct_condition_is_repeatable_by_seed(scenes):
    path = zoo_dir() / "demo-per-image"
    def run(seed):
        return evaluate_conditions(path, scenes, key=None, conditions="correct", seed=seed,
                                               progress=False)["conditions"]["correct"]
    assert run(3)["IoU"] == run(3)["IoU"]


@pytest.mark.parametrize("text", ["", "correct,wrong", "random", "random:0", "random:x", "plain:2"])
def test_bad_conditions_are_refused(text):
    with pytest.raises(EvaluateError):
        parse_conditions(text)


def test_conditions_parse_in_order():
    assert parse_conditions("correct, plain,random:100") == [("correct", 0), ("plain", 0), ("random", 100)]


def test_a_keyed_model_needs_its_key_for_the_correct_condition(cp_demo, scenes):
    with pytest.raises(EvaluateError, match="needs its key"):
        evaluate_conditions(cp_demo[0], scenes, key=None, conditions="correct", progress=False)
    with pytest.raises(EvaluateError, match="has 16 channels"):
        evaluate_conditions(cp_demo[0], scenes, key=CPKey.generate(16), conditions="correct", progress=False)


def test_a_data_set_with_other_classes_is_refused(cp_demo, tmp_path):
    write_synth_dataset(tmp_path, 2, seed=0, size=32, num_classes=3, val_fraction=0.5)
    with pytest.raises(EvaluateError, match="3 classes"):
        evaluate_conditions(cp_demo[0], tmp_path, key=cp_demo[1], conditions="plain", progress=False)


def test_cli_writes_json_and_prints_a_table(cp_demo, scenes, tmp_path, capsys):
    path, _ = cp_demo
    code = main(["evaluate", "--model", str(path), "--data", str(scenes), "--key-file", str(path) + ".json",
                 "--conditions", "correct,plain,random:2", "--json", str(tmp_path / "e.json"), "--quiet",
                 "--device", "cpu"])
    assert code == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["conditions"]) == {"correct", "plain", "random:2"}
    out = capsys.readouterr().out
    assert "correct" in out and "random:2" in out


def test_cli_takes_the_key_from_a_home(scenes, tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["models", "protect", "--model", str(zoo_dir() / "demo-plain"), "--tap", "enc2",
                 "--out", str(tmp_path / "p"), "--home", str(home)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "p"), "--data", str(scenes), "--home", str(home),
                 "--conditions", "correct", "--json", "-", "--quiet", "--device", "cpu"]) == 0
    with_key = json.loads(capsys.readouterr().out)["conditions"]["correct"]["mIoU"]
    plain = evaluate_conditions(zoo_dir() / "demo-plain", scenes, key=None, conditions="correct", progress=False)
    assert with_key == plain["conditions"]["correct"]["mIoU"]
    with Keystore.open(home) as store:
        assert [v.version for v in store.model_key_versions("p")] == [1]
    # the same model imported into the home and named: its weights, encrypted at rest, open in memory
    assert main(["models", "import", "--home", str(home), "--model", str(tmp_path / "p"), "--name", "q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", "q", "--data", str(scenes), "--home", str(home),
                 "--conditions", "correct", "--json", "-", "--quiet", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["conditions"]["correct"]["mIoU"] == with_key


@pytest.mark.parametrize(
    "args, message",
    [
        (["--conditions", "sideways"], "unknown condition"),
        (["--key-file", "/nonexistent/k.json"], "does not exist"),
        (["--conditions", "correct"], "needs its key"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(cp_demo, scenes, capsys, args, message):
    code = main(["evaluate", "--model", str(cp_demo[0]), "--data", str(scenes), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
