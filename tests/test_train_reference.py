"""Training gives the same numbers for the same seed as before the split into models/training/.

The digests below were computed with the single-file `models/train.py` (commit 588b934), one CPU
thread, torch 2.14.1 on an AVX2 CPU: a refactor that changes the order of any random draw, any
operation of the loop or the recipe's defaults changes them. Other CPUs or torch versions round
differently, so elsewhere the losses are compared to 1e-5 instead of the weights bit for bit.
"""

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from seglock.client.transforms import BlockKey
from seglock.models.architectures import build_model
from seglock.models.data import RandomResizedCropFlip, open_dataset, write_synth_dataset
from seglock.models.protect import CPKey
from seglock.models.train import FitConfig, TrainConfig, fit, train

REFERENCE_PLATFORM = ("2.14.1", "AVX2")
EXACT = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability()) == REFERENCE_PLATFORM


def _digest(state):
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth32")
    write_synth_dataset(root, 20, seed=5, size=32, val_fraction=0.2)
    return root


def _check(digest, losses, want_digest, want_losses):
    if EXACT:
        assert digest == want_digest
        assert losses == want_losses
    else:
        assert losses == pytest.approx(want_losses, rel=1e-5)


def test_a_plain_run_trains_the_same_weights(scenes, tmp_path, one_thread):
    config = TrainConfig(data=str(scenes), arch="tiny", epochs=1, batch_size=4, lr=0.05, size=32, device="cpu", seed=3)
    result = train(config, tmp_path / "m", progress=False)
    weights = load_file(str(tmp_path / "m" / "weights.safetensors"))
    _check(_digest(weights), [result.history[0]["train_loss"], result.history[0]["val_loss"]],
           "263ba81f3e6fa02ed3bfb89064e211e56a8a1edbf5ee4cb219a951faedeabb0c",
           [1.5790020823478699, 1.561692237854004])


KEYED = {
    "cp": ({"mode": "cp", "tap": "dec1"}, lambda: CPKey(np.random.default_rng(0).permutation(32)),
           "b725808a8ab649758ecd5df2ec6d9f8fdc9ef68d44a4b1b9f64d21fe91a43522", [1.589443027973175, 1.235414981842041]),
    "shf": ({"mode": "shf", "block_size": 4}, lambda: BlockKey.from_reference("shf", block_size=4, seed=7),
            "1ef42d5c3bf27777ba4e3297751ca2c77740f59f0e7e03c00dc4acd965687e31",
            [1.5935550332069397, 1.214747577905655]),
}


@pytest.mark.parametrize("mode", sorted(KEYED))
def test_a_keyed_fit_with_checkpoints_trains_the_same_weights(mode, scenes, tmp_path, one_thread):
    protection, make_key, want_digest, want_losses = KEYED[mode]
    train_set = open_dataset(scenes, "train", size=32, augment=RandomResizedCropFlip(), seed=3)
    val_set = open_dataset(scenes, "val", size=32)
    torch.manual_seed(11)
    model = build_model("tiny", len(train_set.classes))
    result = fit(model, train_set, val_set, FitConfig(epochs=2, batch_size=4, lr=0.05, device="cpu", seed=2),
                 protection=protection, key=make_key(), progress=False, checkpoint_dir=tmp_path / "ck")
    assert result.best_epoch == 2
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.pt"]
    assert _digest(model.state_dict()) == _digest(result.best_state)
    _check(_digest(result.best_state), [h["train_loss"] for h in result.history], want_digest, want_losses)
