"""Forward backends: every one gives the masks eager gives; compile is bounded, cached, and survives a rotation."""

from __future__ import annotations

import copy
import ctypes
import os
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from seglock.app.backends import (
    CompileJob,
    adopt_threads,
    compile_copy,
    fold_batch_norms,
    forward_clock,
    interleaved_seconds,
    probe_batch,
    set_threads,
    use_compile_cache,
)
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


@pytest.mark.parametrize("backend", ["eager", "channels_last", "fused", "script", "auto"])
def test_each_backend_gives_eager_masks(demo, backend):
    runner = ModelRunner(copy.deepcopy(demo), torch.device("cpu"), backend=backend,
                         probe=probe_batch((INPUT, INPUT), 4), compile_budget_s=0)
    assert runner.backend in ("eager", "channels_last", "fused", "script")
    if backend != "auto":
        assert runner.backend == backend
    assert isinstance(runner.module, torch.jit.ScriptModule) == (runner.backend == "script")
    for seed, batch in ((1, 1), (2, 3), (3, 8)):
        x = inputs(seed, batch)
        assert np.array_equal(runner.predict(x), eager_masks(demo, x))


def test_folding_batch_norms_leaves_none_after_a_convolution_and_keeps_the_logits(demo):
    folded = fold_batch_norms(copy.deepcopy(demo))
    norms = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms == [] and sum(isinstance(m, nn.BatchNorm2d) for m in demo.modules()) == 5
    x = inputs(5, 2)
    with torch.inference_mode():
        # the same function up to float rounding: W*g/s in one convolution instead of two passes
        assert torch.allclose(folded(x), demo(x), atol=1e-4, rtol=1e-4)


def test_candidates_are_timed_in_interleaved_rounds():
    calls: list[str] = []
    ticks = iter(range(100))
    times = interleaved_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                clock=lambda: next(ticks), rounds=3)
    assert calls == ["a", "b", "a", "b", "a", "b"] and times == {"a": 1, "b": 1}


def test_one_cpu_thread_is_timed_by_its_cpu_time_not_the_wall_clock():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert forward_clock(torch.device("cpu")) is time.thread_time
        assert forward_clock(torch.device("cuda")) is time.perf_counter
    finally:
        torch.set_num_threads(before)


def test_a_batch_norm_not_after_a_convolution_stays():
    module = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    folded = fold_batch_norms(copy.deepcopy(module))
    assert [type(m).__name__ for m in folded] == ["ReLU", "BatchNorm2d", "Conv2d", "Identity"]


def test_a_rotation_of_a_fused_model_keeps_it_fused(demo):
    protected = copy.deepcopy(demo)
    key = protect(protected, "dec1")
    runner = ModelRunner(fold_key(copy.deepcopy(protected), "dec1", key), torch.device("cpu"), backend="fused")
    new_key = rekey(protected, "dec1", key)  # what a rotation does: same masks, new weights
    runner.swap(fold_key(copy.deepcopy(protected), "dec1", new_key))
    assert runner.backend == "fused"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in runner.module.modules())
    x = inputs(6, 3)
    assert np.array_equal(runner.predict(x), eager_masks(demo, x))


def test_a_rotation_of_a_scripted_model_traces_the_new_weights(demo):
    protected = copy.deepcopy(demo)
    key = protect(protected, "dec1")
    runner = ModelRunner(fold_key(copy.deepcopy(protected), "dec1", key), torch.device("cpu"), backend="script",
                         probe=probe_batch((INPUT, INPUT), 4))
    before = runner.module
    new_key = rekey(protected, "dec1", key)
    runner.swap(fold_key(copy.deepcopy(protected), "dec1", new_key))
    assert runner.backend == "script" and runner.module is not before
    x = inputs(7, 3)
    assert np.array_equal(runner.predict(x), eager_masks(demo, x))


def test_a_scripted_runner_swapped_to_other_weights_answers_with_them(demo):
    runner = ModelRunner(copy.deepcopy(demo), torch.device("cpu"), backend="script",
                         probe=probe_batch((INPUT, INPUT), 4))
    other = copy.deepcopy(demo)
    with torch.no_grad():  # other weights: the frozen graph of the old ones would answer differently
        for parameter in other.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(9)) * 0.05)
    x = inputs(10, 2)
    assert not np.array_equal(eager_masks(other, x), eager_masks(demo, x))
    runner.swap(copy.deepcopy(other))
    assert runner.backend == "script"
    assert np.array_equal(runner.predict(x), eager_masks(other, x))


class BatchSizeBranch(nn.Module):
    """A forward whose path depends on the batch size: a trace keeps the probe's path only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if x.shape[0] > 1 else -y


def test_a_model_its_trace_would_change_is_served_untraced():
    model = BatchSizeBranch().eval()
    runner = ModelRunner(copy.deepcopy(model), torch.device("cpu"), backend="script", probe=probe_batch((16, 16), 4))
    assert runner.backend == "fused" and not isinstance(runner.module, torch.jit.ScriptModule)
    x = inputs(8, 1)[:, :, :16, :16].contiguous()
    assert np.array_equal(runner.predict(x), eager_masks(model, x))


def test_the_script_backend_needs_a_probe(demo):
    with pytest.raises(ValueError, match="probe batch"):
        ModelRunner(copy.deepcopy(demo), torch.device("cpu"), backend="script")


def openmp_threads_of_a_new_thread(prepare) -> int:
    """omp_get_max_threads() in a fresh thread after `prepare()`: what a oneDNN convolution there uses."""
    libgomp = next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line)
    seen: list[int] = []
    thread = threading.Thread(target=lambda: (prepare(), seen.append(ctypes.CDLL(libgomp).omp_get_max_threads())))
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.skipif(not any("libgomp" in line for line in open("/proc/self/maps")), reason="torch without libgomp")
def test_a_worker_thread_takes_the_process_thread_count():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert openmp_threads_of_a_new_thread(adopt_threads) == 1
        # the reason for adopt_threads: without it a new thread runs OpenMP's start-up count (one per core)
        startup = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        assert openmp_threads_of_a_new_thread(lambda: None) == startup
    finally:
        torch.set_num_threads(before)


def test_unknown_backend_is_refused(demo):
    with pytest.raises(ValueError, match="backend must be one of"):
        ModelRunner(copy.deepcopy(demo), torch.device("cpu"), backend="onnx")


def test_a_compile_over_budget_is_abandoned_and_serving_goes_on(tmp_path):
    use_compile_cache(tmp_path / "cache")
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    probe = torch.randn(2, 3, 8, 8)
    installed = []
    job = CompileJob(compile_copy(module), probe, module(probe).argmax(1),
                     lambda m, x: m(x).argmax(1), budget_s=0.01, rival=None,
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
