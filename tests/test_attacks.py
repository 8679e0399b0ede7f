"""Attacks: key spaces (exact), the assignment solver, and each attack end to end through `seglock attack`.

One tiny model trained for one epoch on a few dozen 64 px scenes serves every end-to-end test;
the numbers it reaches do not matter, only that each attack runs and reports sane, exact-where-exact values.
"""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from seglock.app.cli import main
from seglock.client.transforms import BlockKey
from seglock.models import build_model, load_artifact, protect, save_artifact
from seglock.models.attacks.assignment import linear_assignment
from seglock.models.attacks.key_space import brute_force, key_space, key_space_table, log2_factorial, np_selected_count
from seglock.models.attacks.weight_matching import match_key, reference_tensors, weight_cost
from seglock.models.data import write_synth_dataset
from seglock.models.errors import ModelError
from seglock.models.keyfile import write_key_file
from seglock.models.taps import get_tap
from seglock.models.train import TrainConfig, train

SIZE = 64
TAP = "enc3"  # 64 channels at tiny's default width


# -- key space: exact values ------------------------------------------------------------------------


def test_cp_key_space_is_log2_of_c_factorial():
    assert key_space("cp", channels=12)["log2"] == pytest.approx(math.log2(math.factorial(12)), abs=1e-9)
    # Paper 000 §III-E1: 256! is about 2^1684.
    assert round(key_space("cp", channels=256)["log2"]) == 1684


def test_shf_key_space_is_log2_of_3m2_factorial():
    # Paper 000 §III-E1: (3 x 2 x 2)! is about 4.79 x 10^8 < 2^29.
    entry = key_space("shf", block_size=2)
    assert entry["log2"] == pytest.approx(math.log2(math.factorial(12)), abs=1e-9)
    assert 28 < entry["log2"] < 29


def test_np_key_space_is_3m2_bits_and_seglock_keys_fix_the_count():
    entry = key_space("np", block_size=4)
    assert entry["log2"] == 48.0
    k = np_selected_count(48)
    assert entry["seglock_log2"] == pytest.approx(math.log2(math.comb(48, k)), abs=1e-9)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_np_selected_count_is_what_block_keys_select(block_size):
    key = BlockKey.generate("np", block_size)
    assert int(key.selection.sum()) == np_selected_count(3 * block_size * block_size)


def test_ffx_key_space_is_the_choice_of_positions_plus_seglock_password():
    entry = key_space("ffx", block_size=2)
    assert entry["log2"] == pytest.approx(math.log2(math.comb(12, 5)), abs=1e-9)
    assert entry["seglock_log2"] == pytest.approx(entry["log2"] + 128, abs=1e-9)


def test_per_image_key_space_counts_every_block_and_sub_block_and_gives_the_model_none():
    entry = key_space("per-image", block_size=16, sub_block=4, image_size=[32, 32])
    expected = 4 * math.log2(6) + 64 * 3 * math.log2(math.factorial(16))
    assert entry["log2"] == pytest.approx(expected, rel=1e-12)
    assert entry["model_log2"] == 0.0


def test_log2_factorial_does_not_overflow_for_resnet_taps():
    assert log2_factorial(2048) == pytest.approx(math.lgamma(2049) / math.log(2))


def test_brute_force_expects_half_the_space_at_the_measured_rate():
    result = brute_force(30.0, 0.01)
    assert result["expected_tries_log2"] == 29.0
    assert 10 ** result["log10_seconds"] == pytest.approx(2**29 * 0.01, rel=1e-9)


def test_key_space_table_has_every_mode_and_setting():
    table = key_space_table(taps={"dec2": 16}, block_sizes=(2, 4), image_size=(64, 64), seconds_per_try=0.01)
    assert [(e["mode"], e["params"].get("block_size")) for e in table][:7] == [
        ("cp", None), ("shf", 2), ("shf", 4), ("np", 2), ("np", 4), ("ffx", 2), ("ffx", 4)]
    per_image = [e for e in table if e["mode"] == "per-image"]
    assert [e["params"]["sub_block"] for e in per_image] == [16, 8, 4]
    assert all(e["brute_force"] is None for e in per_image)  # nothing to brute-force on the model


# -- assignment ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_linear_assignment_finds_the_optimal_assignment(n):
    rng = np.random.default_rng(n)
    for _ in range(10):
        cost = rng.normal(size=(n, n))
        found = linear_assignment(cost)
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert sorted(found) == list(range(n))
        assert sum(cost[i, found[i]] for i in range(n)) == pytest.approx(best)


@pytest.mark.parametrize("n", [1, 7, 40, 128])
def test_scipy_and_the_old_hungarian_solver_reach_the_same_total_cost(n):
    from hungarian_oracle import hungarian

    rng = np.random.default_rng(100 + n)
    for trial in range(5):
        # Integer costs: sums are exact in float64, so equal optima compare equal whatever the order.
        cost = rng.integers(-1000, 1000, size=(n, n)).astype(np.float64)
        if trial == 4:
            cost = np.floor(cost / 300)  # many ties: several optimal assignments
        ours, oracle = linear_assignment(cost), hungarian(cost)
        assert sorted(ours) == list(range(n)) and sorted(oracle) == list(range(n))
        assert cost[np.arange(n), ours].sum() == cost[np.arange(n), oracle].sum()


def test_linear_assignment_undoes_a_permutation():
    perm = np.random.default_rng(0).permutation(100)
    cost = np.ones((100, 100))
    cost[np.arange(100), perm] = 0.0
    assert np.array_equal(linear_assignment(cost), perm)


# -- weight matching on weights alone --------------------------------------------------------------


def test_weight_matching_recovers_a_post_hoc_key_from_the_plain_weights():
    torch.manual_seed(0)
    model = build_model("tiny", 4)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    key = protect(model, "dec1")
    recovered = match_key(weight_cost(model.state_dict(), plain, get_tap(model, "dec1")))
    assert recovered == key


def test_a_pretrained_backbone_reveals_taps_inside_it_but_not_those_read_by_the_head():
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 3)
    # A classification checkpoint of the backbone: its keys lack the "backbone." prefix.
    pretrained = {k[len("backbone."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    key = protect(model, "features6")
    recovered = match_key(weight_cost(model.state_dict(), pretrained, get_tap(model, "features6")))
    assert recovered == key
    with pytest.raises(ModelError, match="none of tap 'features16'"):
        reference_tensors(pretrained, get_tap(model, "features16"))


# -- end to end through the CLI --------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, a plain model, a post-hoc CP copy at TAP with its key file, and a trained shf model."""
    root = tmp_path_factory.mktemp("attacks")
    data = root / "data"
    write_synth_dataset(data, 32, 0, SIZE, 4, 0.25)
    torch.set_num_threads(2)
    plain = root / "plain"
    train(TrainConfig(data=str(data), epochs=1, size=SIZE, batch_size=8, lr=0.05, device="cpu"), plain, progress=False)
    model, manifest = load_artifact(plain)
    key = protect(model, TAP)
    protected = root / "cp"
    save_artifact(model, protected, name="cp", class_names=list(manifest.class_names), input_size=manifest.input_size,
                  normalization=manifest.normalization, protection={"mode": "cp", "tap": TAP},
                  key={"id": "cp", "version": 1})
    key_file = write_key_file(root / "cp.key.json", key, model="cp")
    shf = root / "shf"
    train(TrainConfig(data=str(data), protect="shf", block_size=4, epochs=1, size=SIZE, batch_size=8, device="cpu"),
          shf, key_out=root / "shf.key.json", progress=False)
    return {"root": root, "data": data, "plain": plain, "cp": protected, "key_file": key_file, "key": key,
            "shf": shf, "shf_key": root / "shf.key.json"}


def _attack(world, tmp_path, *argv):
    out = tmp_path / "report.json"
    code = main(["attack", *argv, "--out", str(out), "--quiet"])
    assert code == 0
    return json.loads(out.read_text())


def _is_miou(value):
    return isinstance(value, float) and 0.0 <= value <= 100.0


def test_key_space_attack_reports_the_models_key_space_and_a_measured_rate(world, tmp_path):
    report = _attack(world, tmp_path, "key-space", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--repeats", "2")
    assert report["kind"] == "key-space"
    assert report["own"]["log2"] == pytest.approx(math.log2(math.factorial(64)), rel=1e-12)
    assert report["seconds_per_try"] > 0
    assert report["own"]["brute_force"]["log10_years"] > 50
    taps = [e["params"]["tap"] for e in report["entries"] if e["mode"] == "cp"]
    assert taps == ["enc1", "enc2", "enc3", "dec1", "dec2", "enc1,enc2,enc3,dec1,dec2"]  # the last: every tap at once
    every = [e for e in report["entries"] if e["mode"] == "cp"][-1]
    assert every["log2"] == pytest.approx(sum(e["log2"] for e in report["entries"][:5]), rel=1e-12)


def test_random_key_attack_reports_box_plot_statistics(world, tmp_path):
    report = _attack(world, tmp_path, "random-key", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--n", "3", "--key-file", str(world["key_file"]))
    stats = report["conditions"]["random:3"]["mIoU"]
    assert report["kind"] == "random-key" and len(stats["values"]) == 3
    assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
    assert _is_miou(report["conditions"]["plain"]["mIoU"]) and _is_miou(report["conditions"]["correct"]["mIoU"])


def test_random_key_attack_on_a_block_model_without_the_owners_key(world, tmp_path):
    report = _attack(world, tmp_path, "random-key", "--model", str(world["shf"]), "--data", str(world["data"]),
                     "--n", "2")
    assert "correct" not in report["conditions"]
    assert len(report["conditions"]["random:2"]["mIoU"]["values"]) == 2


def test_finetune_attack_retrains_on_the_fraction_and_compares_with_the_owner(world, tmp_path):
    report = _attack(world, tmp_path, "finetune", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--fraction", "0.1", "--epochs", "1", "--key-file", str(world["key_file"]))
    assert report["kind"] == "finetune" and report["fraction"] == 0.1
    assert report["attacker_images"] == math.ceil(0.1 * report["training_images"])
    assert len(report["history"]) == 1
    for name in ("before", "after", "owner"):
        assert _is_miou(report[name]["mIoU"])


def test_finetune_attack_refuses_a_fraction_outside_0_1(world, capsys):
    code = main(["attack", "finetune", "--model", str(world["cp"]), "--data", str(world["data"]), "--fraction", "1.5"])
    assert code == 2
    assert "fraction" in capsys.readouterr().err


def test_weight_matching_against_its_own_plain_weights_recovers_every_channel(world, tmp_path):
    report = _attack(world, tmp_path, "weight-matching", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--reference", str(world["plain"]), "--key-file", str(world["key_file"]))
    assert report["kind"] == "weight-matching" and report["tap"] == TAP
    assert report["channels_recovered"] == report["channels"] == 64
    assert report["fraction_recovered"] == 1.0 and report["exact"] is True
    assert report["mIoU"]["recovered"] == report["mIoU"]["owner"]  # the same key: the same predictions


def test_weight_matching_on_activation_statistics_runs_end_to_end(world, tmp_path):
    report = _attack(world, tmp_path, "weight-matching", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--method", "activations", "--fraction", "0.5", "--key-file", str(world["key_file"]))
    assert report["method"] == "activations" and report["reference"]["kind"] == "data"
    assert 0.0 <= report["fraction_recovered"] <= 1.0
    assert all(_is_miou(v) for v in report["mIoU"].values())


def test_weight_matching_on_batchnorm_statistics_runs_end_to_end(world, tmp_path):
    report = _attack(world, tmp_path, "weight-matching", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--method", "statistics", "--fraction", "0.5", "--key-file", str(world["key_file"]))
    assert report["reference"]["kind"] == "statistics" and report["reference"]["equations"] == 32  # dec1.1's outputs
    assert report["reference"]["misfit_end"] <= report["reference"]["misfit_start"]
    assert 0.0 <= report["fraction_recovered"] <= 1.0


def test_batchnorm_statistics_need_a_batchnorm_after_the_consumer(world, tmp_path, capsys):
    model, manifest = load_artifact(world["plain"])
    protect(model, "dec2")  # read by the 1x1 classifier: no BatchNorm follows
    folder = tmp_path / "cp-dec2"
    save_artifact(model, folder, name="cp-dec2", class_names=list(manifest.class_names),
                  input_size=manifest.input_size, normalization=manifest.normalization,
                  protection={"mode": "cp", "tap": "dec2"}, key={"id": "cp-dec2", "version": 1})
    code = main(["attack", "weight-matching", "--model", str(folder), "--data", str(world["data"]),
                 "--method", "statistics", "--quiet"])
    assert code == 2
    assert "no BatchNorm follows" in capsys.readouterr().err


def test_weight_matching_against_a_model_the_attacker_trains(world, tmp_path):
    report = _attack(world, tmp_path, "weight-matching", "--model", str(world["cp"]), "--data", str(world["data"]),
                     "--fraction", "0.25", "--epochs", "1")
    assert report["reference"]["kind"] == "trained"
    assert "fraction_recovered" not in report  # without the owner's key nothing can be scored
    assert _is_miou(report["mIoU"]["recovered"])


def test_weight_matching_refuses_a_model_without_channel_permutation(world, capsys):
    code = main(["attack", "weight-matching", "--model", str(world["shf"]), "--data", str(world["data"]),
                 "--reference", str(world["plain"])])
    assert code == 2
    assert "not cp" in capsys.readouterr().err
