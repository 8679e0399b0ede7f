"""The registry: a consistent (artifact, key) pair after a rotation cut off at any step, and
workers sharing one home follow each other's rotations."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
import torch

from seglock.app.home import Home, key_material
from seglock.app.observability import Metrics
from seglock.app.registry import Registry
from seglock.app.settings import Settings
from seglock.models import KeyRef, rekey, save_artifact
from seglock.models.protect import CPKey
from tests.server_fixtures import make_artifacts, open_keystore, scene


@pytest.fixture
def home(tmp_path):
    artifacts = make_artifacts(tmp_path / "artifacts")
    home = tmp_path / "home"
    keystore = open_keystore(home)
    path, key = artifacts["cp"]
    Home(home, keystore).import_artifact(path, key=key)
    return home


def registry(home) -> Registry:
    settings = Settings(home=home, import_demo=False, max_batch=2, max_wait_ms=1, warmup=False)
    reg = Registry(settings, open_keystore(home), Metrics(), torch.device("cpu"))
    reg.load_all()
    return reg


def mask(reg: Registry, image: np.ndarray) -> np.ndarray:
    hosted = reg.get("cp")
    batch = hosted.prepare(torch.from_numpy(image)[None])
    return hosted.batcher.run_sync([batch[0]])[0]


def half_rotation(home, steps: int) -> None:
    """Run the first `steps` steps of a CP rotation by hand, as a crash would leave them."""
    keystore = open_keystore(home)
    old_path = Home(home).revisions("cp")[1]
    model, manifest = Home(home, keystore).load_revision("cp", old_path)  # decrypted in memory
    old_key = keystore.get_model_key("cp", 1).material
    new_key = rekey(model, "dec2", CPKey.from_dict(old_key))
    added = keystore.add_model_key("cp", *key_material("cp", new_key), activate=False)
    if steps >= 2:
        save_artifact(model, Home(home).revision_dir("cp", 2), name="cp", class_names=list(manifest.class_names),
                      input_size=list(manifest.input_size), normalization=manifest.normalization,
                      protection={"mode": "cp", "tap": "dec2"}, key=KeyRef(id=added.id, version=added.version),
                      seal=Home(home, keystore)._sealer("cp", 2, "test"))
    if steps >= 3:
        keystore.set_active("cp", added.version)
    if steps >= 4:
        shutil.rmtree(old_path)


@pytest.mark.parametrize("steps, served, destroyed", [(1, 1, [2]), (2, 1, [2]), (3, 2, [1]), (4, 2, [1])])
def test_a_rotation_cut_off_at_any_step_leaves_one_consistent_pair(home, steps, served, destroyed):
    image = scene(1, 32, 32)
    before = mask(registry(home), image)
    half_rotation(home, steps)
    keystore = open_keystore(home)
    path = Home(home, keystore).serving_revision("cp", repair=True)
    assert path.name == f"r{served}"
    assert sorted(Home(home).revisions("cp")) == [served]
    states = {v.version: v.state for v in keystore.model_key_versions("cp")}
    assert states[served] == "active"
    assert [v for v, state in states.items() if state == "destroyed"] == destroyed
    np.testing.assert_array_equal(mask(registry(home), image), before)


def test_a_worker_follows_a_rotation_made_by_another(home):
    image = scene(2, 32, 32)
    first, second = registry(home), registry(home)
    before = mask(second, image)
    result = asyncio.run(first.rotate_key("cp"))
    assert (result["previous_key_version"], result["key_version"]) == (1, 2)
    assert second.current("cp").key_version == 1  # the request path's lookup: what the keystore last read
    second.keystore.refresh()  # a token check does this first
    assert second.current("cp") is None  # a rotation to follow: the route calls get() off the loop
    assert second.get("cp").key_version == 2 and second.get("cp").revision == 2
    assert second.current("cp") is second.get("cp")
    np.testing.assert_array_equal(mask(second, image), before)
    result = asyncio.run(second.rotate_key("cp"))  # and can rotate again from there
    assert (result["previous_key_version"], result["key_version"]) == (2, 3)
    np.testing.assert_array_equal(mask(first, image), before)
    first.close()
    second.close()


def test_max_batch_is_the_batchers_bound_and_exactly_its_batch_without_tuning(home):
    for tune in (True, False):
        settings = Settings(home=home, import_demo=False, max_batch=3, max_wait_ms=1, warmup=False, tune_batch=tune)
        reg = Registry(settings, open_keystore(home), Metrics(), torch.device("cpu"))
        reg.load_all()
        try:
            chosen = reg.get("cp").batcher.max_batch
            assert chosen == 3 if not tune else 1 <= chosen <= 3
        finally:
            reg.close()


def test_a_model_is_warmed_up_on_its_batchers_thread_before_it_serves(home):
    for warmup in (True, False):
        settings = Settings(home=home, import_demo=False, max_batch=2, max_wait_ms=1, warmup=warmup)
        metrics = Metrics()
        reg = Registry(settings, open_keystore(home), metrics, torch.device("cpu"))
        reg.load_all()
        try:
            hosted = reg.get("cp")
            stats = hosted.batcher.stats
            assert (stats.batches, stats.items) == ((1, 1) if warmup else (0, 0))
            assert b"seglock_batch_size_count" not in metrics.render()  # served batches only
            height, width = hosted.manifest.input_size
            asyncio.run(hosted.batcher.submit(hosted.prepare(torch.zeros((1, height, width, 3), dtype=torch.uint8))[0]))
            assert b'seglock_batch_size_count{model="cp"} 1.0' in metrics.render()
        finally:
            reg.close()
