"""The CUDA path, where a machine has CUDA (skipped elsewhere, so in CI): the engine's backends and
precisions on the GPU, the GPU's masks against the CPU's, training and a live server on the GPU.

The rest of the suite runs its in-process servers on `--device auto` (so on the GPU on such a
machine) and its live servers on `SEGLOCK_TEST_DEVICE` (default cpu): with `SEGLOCK_TEST_DEVICE=cuda`
the whole suite exercises the GPU. `benchmarks/gpu.sh` runs both.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from seglock.app.engine import ModelRunner
from seglock.models import build_model, load_artifact
from tests.server_fixtures import _trained_looking, imported_home, live_server, make_artifacts, scene

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
# fp32 on the GPU against fp32 on the CPU: other kernels sum in another order, so a pixel whose two
# best logits nearly tie may flip; bf16 rounds every activation to 8 bits of mantissa and flips more.
FP32_AGREEMENT = 0.999
BF16_AGREEMENT = 0.99


def probe(size: int, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The share of pixels on which two sets of masks agree."""
    return float(np.mean(a == b))


@pytest.mark.parametrize("arch,size", [("tiny", 32), ("lraspp_mobilenet_v3_large", 128)])
@pytest.mark.parametrize("amp", ["off", "auto"])
@pytest.mark.parametrize("backend", ["eager", "auto", "script"])
def test_every_backend_on_cuda_serves_the_masks_of_eager_on_cuda(arch, size, amp, backend):
    module = _trained_looking(build_model(arch, 4), 0)
    batch = probe(size)
    runner = ModelRunner(module, CUDA, amp=amp, backend=backend, probe=batch, name=arch)
    reference = runner._eager_masks(module.to(CUDA), batch.to(CUDA))
    masks = runner.predict(batch)
    print(f"{arch} amp={amp} backend={backend}: serving {runner.backend}")
    assert masks.shape == (4, size, size) and masks.dtype == np.uint8
    assert np.array_equal(masks, reference.cpu().numpy())


@pytest.mark.parametrize("arch,size", [("tiny", 32), ("lraspp_mobilenet_v3_large", 128)])
def test_cuda_masks_agree_with_the_cpu_masks(arch, size):
    module = _trained_looking(build_model(arch, 4), 0)
    batch = probe(size, 8)
    cpu = ModelRunner(module, torch.device("cpu")).predict(batch)
    fp32 = ModelRunner(module, CUDA, amp="off").predict(batch)
    bf16 = ModelRunner(module, CUDA, amp="auto").predict(batch)
    a32, a16 = agreement(fp32, cpu), agreement(bf16, cpu)
    print(f"{arch}: pixels agreeing with the CPU's fp32 masks: fp32 on CUDA {a32:.6f}, autocast {a16:.6f}")
    assert a32 >= FP32_AGREEMENT
    assert a16 >= BF16_AGREEMENT


def test_training_on_cuda_writes_a_model_that_loads(tmp_path):
    cli = [sys.executable, "-m", "seglock.app.cli"]
    subprocess.run([*cli, "data", "synth", "--out", str(tmp_path / "data"), "--n", "24", "--size", "64"],
                   check=True, capture_output=True)
    done = subprocess.run([*cli, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "model"),
                           "--epochs", "2", "--size", "64", "--device", "cuda", "--quiet",
                           "--json", str(tmp_path / "train.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "train.json").read_text())
    print("training on cuda:", {k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
    model, manifest = load_artifact(tmp_path / "model")
    assert list(manifest.input_size) == [64, 64]
    assert next(model.parameters()).device.type == "cpu"  # artifacts load on the CPU whatever trained them


def test_a_live_cuda_server_answers_every_mode_and_keeps_masks_through_a_rotation(tmp_path):
    import httpx

    from seglock.client import SegLockClient

    artifacts = make_artifacts(tmp_path / "artifacts")
    home, keystore = imported_home(tmp_path, artifacts)
    token = keystore.create_token("gpu", ["segment", "admin"], ["*"])[1]
    images = [scene(seed, 40, 48) for seed in range(4)]
    with live_server(home, "--device", "cuda") as server:
        with SegLockClient(server["base"], token, timeout=120) as sdk:
            masks = {model: [sdk.segment(image, model) for image in images]
                     for model in ("plain", "cp", "shf", "per-image")}
            for model, answered in masks.items():
                assert all(mask.shape == (40, 48) and mask.dtype == np.uint8 for mask in answered), model
            rotated = httpx.post(f"{server['base']}/admin/models/cp/rotate-key",
                                 headers={"Authorization": f"Bearer {token}"}, timeout=120)
            assert rotated.status_code == 200, rotated.text
            after = [sdk.segment(image, "cp") for image in images]
        v2 = httpx.get(f"{server['base']}/v2/models/cp", headers={"Authorization": f"Bearer {token}"})
        log = server["log"].read_text()
    same = agreement(np.stack(masks["cp"]), np.stack(after))
    print(f"cp masks before and after rotation on cuda agree on {same:.6f} of pixels; /v2 metadata "
          f"{v2.json().get('parameters')}")
    assert same >= BF16_AGREEMENT
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("backend", ["auto", "script"])
def test_a_cuda_runner_pads_small_batches_to_the_probes_size(backend):
    module = _trained_looking(build_model("lraspp_mobilenet_v3_large", 4), 0)
    batch = probe(128, 8)
    runner = ModelRunner(module, CUDA, backend=backend, probe=batch, name="padded")
    assert runner.pad_to == 8
    alone = runner.predict(batch[:3])  # run as a batch of 8: three images and five zero ones
    together = runner.predict(batch)[:3]
    share = agreement(alone, together)
    print(f"{backend} ({runner.backend}): three images padded to 8 agree with them in a full batch on {share:.6f}")
    assert alone.shape == (3, 128, 128)
    assert share >= FP32_AGREEMENT
