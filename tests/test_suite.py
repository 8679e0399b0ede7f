"""The thief's advantage (issue 12): multi-tap attacks, downstream retraining, the learned key and the suite.

One tiny model trained for one epoch on a few dozen 32 px scenes, protected post hoc at several taps,
serves every test: the mIoU values do not matter here, only that each attack runs on every keyed tap
and that the suite's arithmetic (advantage = attack - best alternative, verdict = the largest) is exact.
"""

import json

import pytest
import torch

from seglock.app.cli import main
from seglock.models import load_artifact, protect, save_artifact
from seglock.models.attacks.downstream import front_modules
from seglock.models.attacks.learned_key import sinkhorn
from seglock.models.attacks.recipes import RECIPES, parse_recipes
from seglock.models.attacks.weight_matching import weight_matching_attack
from seglock.models.data import write_synth_dataset
from seglock.models.errors import ModelError
from seglock.models.keyfile import write_key_file
from seglock.models.taps import get_tap
from seglock.models.train import TrainConfig, train

SIZE = 32
TAPS = "enc1,enc3,dec1"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    data = root / "data"
    write_synth_dataset(data, 24, 0, SIZE, 4, 0.25)
    torch.set_num_threads(2)
    plain = root / "plain"
    train(TrainConfig(data=str(data), epochs=1, size=SIZE, batch_size=8, lr=0.05, device="cpu"), plain, progress=False)
    model, manifest = load_artifact(plain)
    key = protect(model, TAPS)
    protected = root / "cp"
    save_artifact(model, protected, name="cp", class_names=list(manifest.class_names), input_size=manifest.input_size,
                  normalization=manifest.normalization, protection={"mode": "cp", "tap": TAPS},
                  key={"id": "cp", "version": 1})
    key_file = write_key_file(root / "cp.key.json", key, model="cp")
    return {"root": root, "data": data, "plain": plain, "cp": protected, "key_file": key_file, "key": key}


def _attack(tmp_path, *argv):
    out = tmp_path / "report.json"
    assert main(["attack", *argv, "--out", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def _is_miou(value):
    return isinstance(value, float) and 0.0 <= value <= 100.0


# -- pieces -------------------------------------------------------------------------------------------


def test_sinkhorn_gives_a_doubly_stochastic_matrix():
    p = sinkhorn(torch.randn(6, 6, dtype=torch.float64), iterations=200)
    assert torch.allclose(p.sum(0), torch.ones(6, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(p.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-9)


def test_sinkhorn_of_sharp_logits_is_their_permutation():
    perm = torch.tensor([2, 0, 3, 1])
    logits = torch.full((4, 4), -50.0, dtype=torch.float64)
    logits[torch.arange(4), perm] = 0.0
    assert torch.equal(sinkhorn(logits).argmax(1), perm)


def test_front_modules_are_those_before_the_first_keyed_tap(world):
    model, manifest = load_artifact(world["plain"])
    front = front_modules(model, get_tap(model, "enc3"), manifest)
    assert front and all(name.startswith(("enc1.", "enc2.", "enc3.")) for name in front)
    assert any(name.startswith("enc3.") for name in front)


def test_recipes_parse_by_name_with_the_budget_applied():
    recipes = parse_recipes("sgd-0.02,adam-1e-3", epochs=3, batch_size=4)
    assert [r.name for r in recipes] == ["sgd-0.02", "adam-1e-3"]
    assert all(r.epochs == 3 and r.batch_size == 4 for r in recipes)
    assert [r.name for r in parse_recipes("all")] == list(RECIPES)
    with pytest.raises(ModelError, match="unknown recipe 'rmsprop'"):
        parse_recipes("rmsprop")


# -- attacks on every keyed tap ---------------------------------------------------------------------


def test_weight_matching_recovers_every_tap_of_a_multi_tap_key_from_the_plain_weights(world, tmp_path):
    report = _attack(tmp_path, "weight-matching", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--reference", str(world["plain"]), "--key-file", str(world["key_file"]))
    assert report["tap"] == TAPS and set(report["per_tap"]) == {"enc1", "enc3", "dec1"}
    assert report["channels_recovered"] == report["channels"] == 16 + 64 + 32
    assert all(v["exact"] for v in report["per_tap"].values())
    assert report["mIoU"]["recovered"] == report["mIoU"]["owner"]


@pytest.mark.parametrize("method", ["activations", "statistics"])
def test_data_matching_runs_on_every_keyed_tap(world, tmp_path, method):
    report = _attack(tmp_path, "weight-matching", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--method", method, "--fraction", "0.5", "--key-file", str(world["key_file"]))
    assert set(report["per_tap"]) == {"enc1", "enc3", "dec1"}
    assert 0 <= report["channels_recovered"] <= report["channels"] == 112
    assert all(_is_miou(v) for v in report["mIoU"].values())


def test_statistics_skip_a_tap_without_batchnorm_when_others_can_be_matched(world):
    model, manifest = load_artifact(world["plain"])
    protect(model, "enc3,dec2")  # dec2 feeds the 1x1 classifier: no BatchNorm after it
    folder = world["root"] / "cp-dec2"
    save_artifact(model, folder, name="cp-dec2", class_names=list(manifest.class_names),
                  input_size=manifest.input_size, normalization=manifest.normalization,
                  protection={"mode": "cp", "tap": "enc3,dec2"}, key={"id": "x", "version": 1})
    report = weight_matching_attack(folder, world["data"], method="statistics", fraction=0.5, progress=False)
    assert "no BatchNorm follows" in report["per_tap"]["dec2"]["skipped"]
    assert "skipped" not in report["per_tap"]["enc3"]


def test_downstream_retraining_freezes_the_front_and_reports_each_recipe(world, tmp_path):
    report = _attack(tmp_path, "downstream", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--fraction", "0.5", "--epochs", "1", "--recipes", "sgd-0.02,adam-1e-3",
                     "--key-file", str(world["key_file"]))
    assert report["kind"] == "downstream" and report["first_tap"] == "enc1"
    assert [r["recipe"]["name"] for r in report["runs"]] == ["sgd-0.02", "adam-1e-3"]
    assert report["mIoU"] == max(r["mIoU"] for r in report["runs"])
    assert 0 < report["frozen_parameters"] < report["parameters"]
    assert _is_miou(report["owner"]["mIoU"]) and _is_miou(report["no_key"]["mIoU"])


def test_downstream_leaves_the_frozen_front_bit_for_bit(world):
    from seglock.models.attacks.downstream import downstream_attack
    from seglock.models.attacks.stolen import load_stolen

    stolen = load_stolen(world["cp"], world["data"], fraction=0.5)
    before = {k: v.clone() for k, v in stolen.model.state_dict().items()}
    captured = {}
    import seglock.models.attacks.downstream as module

    original = module.thief_fit

    def spy(model, *args, **kwargs):
        history = original(model, *args, **kwargs)
        captured["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return history

    module.thief_fit = spy
    try:
        downstream_attack(stolen, recipes=parse_recipes("sgd-0.02", epochs=1), progress=False)
    finally:
        module.thief_fit = original
    front = [k for k in before if k.startswith("enc1.")]
    assert front and all(torch.equal(captured["state"][k], before[k]) for k in front)
    assert not torch.equal(captured["state"]["classifier.weight"], before["classifier.weight"])


def test_learned_key_reports_a_key_for_every_tap_and_the_channels_recovered(world, tmp_path):
    report = _attack(tmp_path, "learned-key", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--fraction", "0.5", "--epochs", "1", "--key-file", str(world["key_file"]))
    assert report["kind"] == "learned-key" and report["taps"] == ["enc1", "enc3", "dec1"]
    assert set(report["channels_recovered"]) == {"enc1", "enc3", "dec1"}
    assert 0.0 <= report["fraction_recovered"] <= 1.0 and _is_miou(report["mIoU"])


def test_finetune_with_recipes_reports_the_best(world, tmp_path):
    report = _attack(tmp_path, "finetune", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--fraction", "0.5", "--epochs", "1", "--recipes", "sgd-0.02,adam-1e-3")
    assert report["after"]["mIoU"] == max(r["after"]["mIoU"] for r in report["runs"])
    assert report["best_recipe"] in ("sgd-0.02", "adam-1e-3")


def test_the_new_attacks_refuse_a_plain_model(world, capsys):
    code = main(["attack", "learned-key", "--model", str(world["plain"]), "--data", str(world["data"]), "--quiet"])
    assert code == 2
    assert "not cp" in capsys.readouterr().err


# -- the suite ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite-out") / "suite.json"
    code = main(["attack", "suite", "--model", str(world["cp"]), "--data", str(world["data"]), "--fraction", "0.5",
                 "--epochs", "1", "--recipes", "sgd-0.02,adam-1e-3", "--key-file", str(world["key_file"]),
                 "--cache", str(world["root"] / "cache"), "--json", str(out), "--quiet"])
    assert code == 0
    return json.loads(out.read_text())


def test_suite_json_has_the_documented_fields(suite):
    assert suite["kind"] == "suite" and suite["model"] == "cp" and suite["fraction"] == 0.5
    assert {"owner", "no_key", "alternatives", "attacks", "advantage"} <= set(suite)
    assert suite["alternatives"]["public"] is None  # no --backbone-weights
    assert _is_miou(suite["owner"]["mIoU"]) and _is_miou(suite["no_key"]["mIoU"])
    for attack in suite["attacks"]:
        assert {"name", "mIoU", "seconds", "advantage"} <= set(attack)


def test_suite_runs_every_applicable_attack(suite):
    names = [a["name"] for a in suite["attacks"]]
    assert names == ["no-key", "finetune", "downstream", "learned-key", "class-profile", "statistics",
                     "weights-trained"]


def test_suite_advantage_is_attack_minus_the_best_alternative_and_the_verdict_the_largest(suite):
    best = suite["alternatives"]["scratch"]["mIoU"]
    assert suite["best_alternative"] == best
    assert best == max(r["mIoU"] for r in suite["alternatives"]["scratch"]["runs"])
    for attack in suite["attacks"]:
        assert attack["advantage"] == pytest.approx(attack["mIoU"] - best, abs=1e-4)
    assert suite["advantage"] == max(a["advantage"] for a in suite["attacks"])
    worst = next(a for a in suite["attacks"] if a["advantage"] == suite["advantage"])
    assert suite["worst_attack"] == worst["name"]


def test_suite_no_key_attack_is_the_stolen_file_as_it_is(suite):
    no_key = next(a for a in suite["attacks"] if a["name"] == "no-key")
    assert no_key["mIoU"] == suite["no_key"]["mIoU"]


def test_suite_reuses_cached_alternatives(world, suite, tmp_path):
    report = _attack(tmp_path, "suite", "--model", str(world["cp"]), "--data", str(world["data"]), "--fraction",
                     "0.5", "--epochs", "1", "--recipes", "sgd-0.02,adam-1e-3", "--attacks", "no-key",
                     "--cache", str(world["root"] / "cache"))
    assert report["alternatives"]["scratch"]["runs"] == suite["alternatives"]["scratch"]["runs"]
    assert [a["name"] for a in report["attacks"]] == ["no-key"]


def test_suite_repeats_average_every_training_over_thief_seeds(world, suite, tmp_path):
    report = _attack(tmp_path, "suite", "--model", str(world["cp"]), "--data", str(world["data"]), "--fraction",
                     "0.5", "--epochs", "1", "--recipes", "sgd-0.02,adam-1e-3", "--attacks", "no-key,finetune",
                     "--repeats", "2", "--cache", str(world["root"] / "cache"))
    scratch = report["alternatives"]["scratch"]
    assert report["repeats"] == 2 and scratch["trial_seeds"] == [0, 1000]
    # trial 0 is the single-run suite's training (the same cache entry); trial 1 is another seed
    assert scratch["runs"] == suite["alternatives"]["scratch"]["runs"]
    assert scratch["trials"][0] == suite["alternatives"]["scratch"]["mIoU"]
    assert scratch["mIoU"] == pytest.approx(sum(scratch["trials"]) / 2, abs=1e-9)
    assert report["best_alternative"] == scratch["mIoU"]
    finetune = next(a for a in report["attacks"] if a["name"] == "finetune")
    assert finetune["details"]["trials"][0] == next(a for a in suite["attacks"] if a["name"] == "finetune")["mIoU"]
    assert finetune["mIoU"] == pytest.approx(sum(finetune["details"]["trials"]) / 2, abs=1e-9)
    assert finetune["advantage"] == pytest.approx(finetune["mIoU"] - scratch["mIoU"], abs=1e-4)
    no_key = next(a for a in report["attacks"] if a["name"] == "no-key")
    assert "trials" not in no_key["details"]  # no training, nothing to repeat


def test_suite_refuses_repeats_below_one(world, capsys):
    code = main(["attack", "suite", "--model", str(world["cp"]), "--data", str(world["data"]), "--repeats", "0",
                 "--quiet"])
    assert code == 2
    assert "repeats must be a positive integer" in capsys.readouterr().err


def test_suite_refuses_an_unknown_attack(world, capsys):
    code = main(["attack", "suite", "--model", str(world["cp"]), "--data", str(world["data"]), "--attacks", "magic",
                 "--quiet"])
    assert code == 2
    assert "unknown attack 'magic'" in capsys.readouterr().err


def test_suite_refuses_public_weights_for_an_architecture_without_a_backbone(world, capsys):
    code = main(["attack", "suite", "--model", str(world["cp"]), "--data", str(world["data"]), "--epochs", "1",
                 "--backbone-weights", str(world["plain"] / "weights.safetensors"), "--quiet"])
    assert code == 2
    assert "public pretrained start failed" in capsys.readouterr().err


def test_report_shows_the_suite_verdict_and_every_attack(suite, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "suite.json").write_text(json.dumps(suite))
    assert main(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## The thief's advantage (attack suite)" in text
    assert f"| cp | {TAPS} | 50 % |" in text
    assert f"{suite['advantage']:+.2f}" in text
    for attack in suite["attacks"]:
        assert f"| cp | {attack['name']} |" in text
