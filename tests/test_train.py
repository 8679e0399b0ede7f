"""Training: the loss falls, keys go where they should, CP-trained weights need their key, runs resume."""

import json
import math
import os
import stat

import pytest
import torch

from seglock.app.cli import main
from seglock.app.home import HomeKeySink
from seglock.client.transforms import BlockKey
from seglock.keystore import Keystore
from seglock.models import apply_key, fold_key, load_artifact
from seglock.models.data import write_synth_dataset
from seglock.models.inputs import model_input
from seglock.models.keyfile import read_key_file
from seglock.models.protect import CPKey
from seglock.models.train import CHECKPOINT_DIR, FitConfig, TrainConfig, TrainError, fit, lr_factor, train


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth64")
    write_synth_dataset(root, 40, seed=5, size=64, val_fraction=0.2)
    return root


def _config(scenes, **overrides):
    options = dict(data=str(scenes), arch="tiny", epochs=2, batch_size=8, lr=0.1, size=64, device="cpu", seed=3)
    options.update(overrides)
    return TrainConfig(**options)


def _batch(scenes, n=8):
    from seglock.models.data import open_dataset

    data = open_dataset(scenes, "val", size=64)
    images, masks = zip(*(data[i] for i in range(n)), strict=False)
    return torch.stack(images), torch.stack(masks)


@pytest.fixture(scope="module")
def plain_run(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "m"
    return train(_config(scenes, epochs=3), out, progress=False), out


def test_training_lowers_the_loss(plain_run):
    result, _ = plain_run
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[2] < losses[0]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert all({"train_loss", "val_loss", "val_mIoU", "lr"} <= set(h) for h in result.history)


def test_best_epoch_is_the_lowest_validation_loss_and_its_weights_are_saved(plain_run, scenes):
    result, out = plain_run
    val = [h["val_loss"] for h in result.history]
    assert result.best_epoch == val.index(min(val)) + 1
    model, manifest = load_artifact(out)
    assert manifest.mode == "none" and manifest.key is None and manifest.name == "m"
    assert manifest.class_names == tuple(json.loads((scenes / "classes.json").read_text()))
    assert manifest.input_size == (64, 64)
    from seglock.models.data import open_dataset

    images, masks = zip(*open_dataset(scenes, "val", size=64), strict=False)
    with torch.no_grad():
        logits = model(model_input(torch.stack(images), manifest))
    loss = torch.nn.functional.cross_entropy(logits, torch.stack(masks), ignore_index=255).item()
    assert loss == pytest.approx(result.history[result.best_epoch - 1]["val_loss"], rel=1e-5)


def test_artifact_replaces_the_checkpoint(plain_run):
    _, out = plain_run
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "weights.safetensors"]


def test_cp_trained_weights_need_their_key(scenes, tmp_path):
    result = train(_config(scenes, protect="cp", tap="dec1", epochs=3), tmp_path / "cp",
                   key_out=tmp_path / "cp.json", progress=False)
    model, manifest = load_artifact(tmp_path / "cp")
    key = read_key_file(tmp_path / "cp.json").key
    assert key == result.key and manifest.protection == {"mode": "cp", "tap": "dec1", "channels": 32}
    images, masks = _batch(scenes)
    x = model_input(images, manifest)
    with torch.no_grad():
        keyed = apply_key(model, "dec1", key)(x)
        folded = fold_key(model, "dec1", key)(x)
        stolen = model(x)
    torch.testing.assert_close(folded, keyed, rtol=1e-5, atol=1e-5)
    loss = torch.nn.functional.cross_entropy
    assert loss(keyed, masks) < loss(stolen, masks)


def test_key_file_is_0600_and_the_manifest_holds_no_material(scenes, tmp_path):
    result = train(_config(scenes, protect="shf", block_size=4, epochs=1), tmp_path / "shf",
                   key_out=tmp_path / "shf.json", progress=False)
    assert stat.S_IMODE(os.stat(tmp_path / "shf.json").st_mode) == 0o600
    found = read_key_file(tmp_path / "shf.json")
    assert found.kind == "block" and found.model == "shf" and found.key == result.key
    text = (tmp_path / "shf" / "manifest.json").read_text()
    assert "permutation" not in text and json.dumps(result.key.permutation.tolist()[:8])[1:-1] not in text
    assert json.loads(text)["key"]["version"] == 1


def test_keystore_path_stores_the_key_the_manifest_names(scenes, tmp_path):
    home = tmp_path / "home"
    result = train(_config(scenes, protect="cp", tap="enc3", epochs=1, name="keyed"), tmp_path / "m",
                   key_sink=HomeKeySink(home), progress=False)
    with Keystore.open(home) as store:
        active = store.active_model_key("keyed")
    assert (active.id, active.version) == (result.key_ref.id, result.key_ref.version)
    assert CPKey.from_dict(active.material) == result.key
    assert load_artifact(tmp_path / "m")[1].key == result.key_ref


def test_a_taken_name_in_the_home_is_refused_before_training(scenes, tmp_path):
    home = tmp_path / "home"
    with Keystore.open(home, create=True) as store:
        store.add_model_key("taken", "cp", CPKey.generate(4).to_dict())
    with pytest.raises(TrainError, match="already has a model named 'taken'"):
        train(_config(scenes, protect="cp", tap="dec1", name="taken"), tmp_path / "m", key_sink=HomeKeySink(home),
              progress=False)
    assert not (tmp_path / "m").exists()


class _Stop(Exception):
    pass


def _stop_after_first_epoch(record):
    if record["epoch"] == 1:
        raise _Stop


def test_an_interrupted_run_resumes_to_the_same_weights(scenes, tmp_path):
    straight = train(_config(scenes), tmp_path / "straight", progress=False)
    with pytest.raises(_Stop):
        train(_config(scenes), tmp_path / "resumed", progress=False, on_epoch=_stop_after_first_epoch)
    assert (tmp_path / "resumed" / CHECKPOINT_DIR / "last.pt").is_file()
    with pytest.raises(TrainError, match="--resume"):
        train(_config(scenes), tmp_path / "resumed", progress=False)
    resumed = train(_config(scenes, resume=True), tmp_path / "resumed", progress=False)
    assert resumed.history == [
        {**h, "seconds": r["seconds"]} for h, r in zip(straight.history, resumed.history, strict=False)
    ]
    a, _ = load_artifact(tmp_path / "straight")
    b, _ = load_artifact(tmp_path / "resumed")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=False):
        assert torch.equal(x, y), name
    assert not (tmp_path / "resumed" / CHECKPOINT_DIR).exists()


def test_without_a_seed_each_run_draws_a_secret_one_that_resume_keeps(scenes, tmp_path):
    from seglock.models.training.checkpoint import load_checkpoint

    secret = _config(scenes, seed=None)
    with pytest.raises(_Stop):
        train(secret, tmp_path / "resumed", progress=False, on_epoch=_stop_after_first_epoch)
    seed = load_checkpoint(tmp_path / "resumed" / CHECKPOINT_DIR)["fingerprint"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**31
    resumed = train(_config(scenes, seed=None, resume=True), tmp_path / "resumed", progress=False)
    straight = train(_config(scenes, seed=seed), tmp_path / "straight", progress=False)
    other = train(secret, tmp_path / "other", progress=False)
    assert resumed.history == [{**h, "seconds": r["seconds"]} for h, r in zip(straight.history, resumed.history,
                                                                                strict=True)]
    assert other.history != straight.history  # another secret seed, another run
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert "seed" not in json.dumps(manifest) and not (tmp_path / "resumed" / CHECKPOINT_DIR).exists()


def test_a_resumed_keyed_run_keeps_its_key(scenes, tmp_path):
    with pytest.raises(_Stop):
        train(_config(scenes, protect="np", block_size=4), tmp_path / "m", key_out=tmp_path / "k.json",
              progress=False, on_epoch=_stop_after_first_epoch)
    saved = tmp_path / "m" / CHECKPOINT_DIR / "key.json"
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(saved.parent).st_mode) == 0o700
    key = read_key_file(saved).key
    assert not (tmp_path / "k.json").exists()  # the key file is written with the artifact
    result = train(_config(scenes, protect="np", block_size=4, resume=True), tmp_path / "m",
                   key_out=tmp_path / "k.json", progress=False)
    assert result.key == key and read_key_file(tmp_path / "k.json").key == key


def test_poly_schedule_is_paper_000_eq_8():
    total = 30 * 42
    assert lr_factor(0, total, 42, "poly") == 1.0
    assert lr_factor(total // 2, total, 42, "poly") == 0.5 ** 0.9
    assert lr_factor(total, total, 42, "poly") == 0.0


def test_cosine_schedule_restarts_every_ten_epochs():
    assert lr_factor(0, 1000, 5, "cosine") == 1.0
    assert lr_factor(50, 1000, 5, "cosine") == 1.0
    assert lr_factor(25, 1000, 5, "cosine") == pytest.approx(0.5 * (1 + 1e-3))
    assert min(lr_factor(s, 1000, 5, "cosine") for s in range(50)) > 1e-3


def test_fit_refuses_a_key_that_does_not_fit(scenes):
    from seglock.models import build_model
    from seglock.models.data import open_dataset

    data = open_dataset(scenes, "train", size=64)
    model = build_model("tiny", 6)
    with pytest.raises(TrainError, match="shf BlockKey of block size 4"):
        fit(model, data, None, FitConfig(epochs=1, lr=0.1), protection={"mode": "shf", "block_size": 4},
            key=BlockKey.generate("shf", 2), progress=False)
    with pytest.raises(TrainError, match="the key has 16 channels but tap 'dec1' has 32"):
        fit(model, data, None, FitConfig(epochs=1, lr=0.1), protection={"mode": "cp", "tap": "dec1"},
            key=CPKey.generate(16), progress=False)


@pytest.mark.parametrize(
    "overrides, kwargs, message",
    [
        ({"protect": "shf"}, {}, "--home"),
        ({"protect": "shf", "size": 66}, {"key_out": "k.json"}, "does not fit shf"),
        ({"protect": "none", "tap": "dec1"}, {}, "tap applies to cp"),
        ({"epochs": 0}, {}, "epochs must be a positive integer"),
        ({"lr": math.nan}, {}, "lr must be a positive number"),
    ],
)
def test_bad_options_are_refused_before_any_work(scenes, tmp_path, overrides, kwargs, message):
    kwargs = {k: tmp_path / v for k, v in kwargs.items()}
    with pytest.raises(TrainError, match=message):
        train(_config(scenes, **overrides), tmp_path / "m", progress=False, **kwargs)
    assert not (tmp_path / "m").exists()


def test_cli_trains_and_writes_json(scenes, tmp_path, capsys):
    code = main(["train", "--data", str(scenes), "--protect", "cp", "--tap", "dec2", "--epochs", "1",
                 "--size", "64", "--device", "cpu", "--out", str(tmp_path / "m"),
                 "--key-out", str(tmp_path / "k.json"), "--json", str(tmp_path / "run.json"), "--quiet"])
    assert code == 0
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["name"] == "m" and summary["best_epoch"] == 1 and summary["key_file"] == str(tmp_path / "k.json")
    assert summary["config"]["protect"] == "cp" and "perm" not in json.dumps(summary)
    assert "trained m (tiny, cp)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--protect", "shf"], "store it in a keystore"),
        (["--arch", "nope"], "unknown architecture"),
        (["--arch-arg", "width"], "expected KEY=VALUE"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(scenes, tmp_path, capsys, args, message):
    code = main(["train", "--data", str(scenes), "--size", "64", "--epochs", "1", "--device", "cpu",
                 "--out", str(tmp_path / "m"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_the_recipe_has_one_home_that_the_cli_and_the_attacks_read():
    import inspect

    from seglock.app.cli import build_parser
    from seglock.models.attacks import finetune_attack
    from seglock.models.train import RECIPE

    assert (RECIPE.epochs, RECIPE.batch_size, RECIPE.lr, RECIPE.momentum, RECIPE.weight_decay, RECIPE.schedule,
            RECIPE.poly_power) == (30, 8, 0.02, 0.9, 1e-4, "poly", 0.9)  # paper 000 section IV-A at seglock's scale
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    from seglock.app.commands.train import resolve_defaults

    resolve_defaults(args)
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.weight_decay, args.schedule, args.size) == (
        RECIPE.epochs, RECIPE.batch_size, RECIPE.lr, RECIPE.momentum, RECIPE.weight_decay, RECIPE.schedule,
        TrainConfig.size)
    defaults = inspect.signature(finetune_attack).parameters
    assert (defaults["epochs"].default, defaults["batch_size"].default, defaults["lr"].default) == (
        RECIPE.epochs, RECIPE.batch_size, RECIPE.lr)


def test_cp_without_a_tap_keys_the_architectures_default_tap_set():
    from seglock.models.training.config import TrainConfig as Config

    assert Config(data="d", protect="cp").protection() == {"mode": "cp", "tap": "all"}
