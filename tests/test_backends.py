"""Forward backends: every one gives the masks eager gives; compile is bounded, cached, and survives a rotation."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from torch import nn

from seglock.app.backends import CompileJob, compile_copy, probe_batch, use_compile_cache
from seglock.app.engine import ModelRunner
from seglock.models import fold_key, load_artifact, protect, rekey
from seglock.models.zoo import zoo_dir

INPUT = 128


@pytest.fixture(scope="module")
def demo():
    model, _ = load_artifact(zoo_dir() / "demo-plain")
    return model.eval()


def inputs(seed: int, batch: int) -> torch.Tensor:
    return torch.randn((batch, 3, INPUT, INPUT), generator=torch.Generator().manual_seed(seed))


def eager_masks(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(batch).argmax(1).to(torch.uint8).numpy()


@pytest.mark.parametrize("backend", ["eager", "channels_last", "auto"])
def test_each_backend_gives_eager_masks(demo, backend):
    runner = ModelRunner(copy.deepcopy(demo), torch.device("cpu"), backend=backend,
                         probe=probe_batch((INPUT, INPUT), 4), compile_budget_s=0)
    assert runner.backend in ("eager", "channels_last")
    if backend == "channels_last":
        assert runner.backend == "channels_last"
    for seed, batch in ((1, 1), (2, 3), (3, 8)):
        x = inputs(seed, batch)
        assert np.array_equal(runner.predict(x), eager_masks(demo, x))


def test_unknown_backend_is_refused(demo):
    with pytest.raises(ValueError, match="backend must be one of"):
        ModelRunner(copy.deepcopy(demo), torch.device("cpu"), backend="onnx")


def test_a_compile_over_budget_is_abandoned_and_serving_goes_on(tmp_path):
    use_compile_cache(tmp_path / "cache")
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    probe = torch.randn(2, 3, 8, 8)
    installed = []
    job = CompileJob(compile_copy(module), probe, module(probe).argmax(1),
                     lambda m, x: m(x).argmax(1), budget_s=0.01, must_be_faster=False,
                     on_ready=lambda compiled, seconds: installed.append(compiled), name="tiny")
    assert job.start().wait(30) == "abandoned"
    job._thread.join(300)  # the compile itself cannot be interrupted; its result must be dropped
    assert installed == [] and job.state == "abandoned"


@pytest.mark.slow
def test_compiled_module_gives_eager_masks_and_rotation_keeps_it_compiled(demo, tmp_path):
    """Minutes on 2 cores: inductor generates and compiles C++ kernels."""
    use_compile_cache(tmp_path / "cache")
    protected = copy.deepcopy(demo)
    key = protect(protected, "dec1")
    served = fold_key(copy.deepcopy(protected), "dec1", key)
    runner = ModelRunner(copy.deepcopy(served), torch.device("cpu"), backend="compile",
                         probe=probe_batch((INPUT, INPUT), 8), compile_budget_s=1800, name="demo")
    assert runner.compile_job.wait(1800) == "ready", runner.compile_job.state
    first_compile = runner.compile_job.seconds
    assert runner.backend == "compile"
    for seed, batch in ((1, 1), (2, 3), (3, 8)):
        x = inputs(seed, batch)
        assert np.array_equal(runner.predict(x), eager_masks(demo, x))

    from torch._dynamo.utils import counters

    frames = dict(counters["frames"])
    new_key = rekey(protected, "dec1", key)  # what a rotation does: same masks, new weights
    runner.swap(fold_key(copy.deepcopy(protected), "dec1", new_key))
    started = time.perf_counter()
    x = inputs(4, 5)
    assert np.array_equal(runner.predict(x), eager_masks(demo, x))
    assert runner.backend == "compile" and dict(counters["frames"]) == frames  # nothing recompiled
    assert time.perf_counter() - started < 10

    # a restart (a new module, the same cache) pays the trace only, not the code generation
    again = ModelRunner(copy.deepcopy(served), torch.device("cpu"), backend="compile",
                        probe=probe_batch((INPUT, INPUT), 8), compile_budget_s=1800, name="again")
    assert again.compile_job.wait(1800) == "ready"
    assert again.compile_job.seconds < first_compile / 2, (again.compile_job.seconds, first_compile)
