"""One device policy for serving and training: the same specs, the same refusals, the same words."""

import pytest
import torch

from seglock.app.cli import main
from seglock.models.device import DeviceError, resolve_device


def test_cpu_and_auto_resolve_on_any_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:x", "meta", "cpu:0", "", None, 3])
def test_malformed_specs_are_refused_with_the_choices(spec):
    with pytest.raises(DeviceError, match=r"^unknown device .*: use auto, cpu, cuda, cuda:N or mps$"):
        resolve_device(spec)


def test_mps_is_refused_where_it_is_not_available():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(DeviceError) as info:
        resolve_device("mps")
    assert str(info.value) == "device 'mps' asked for but MPS is not available"


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with exactly one CUDA device, as torch reports it (no GPU here to ask)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_a_missing_cuda_index_is_refused_on_a_one_gpu_machine(one_gpu):
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda:7")
    assert str(info.value) == "device 'cuda:7' is not there: this machine has 1 CUDA device (cuda:0 to cuda:0)"


MISSING = {
    True: "seglock: error: device 'cuda:7' is not there: this machine has 1 CUDA device (cuda:0 to cuda:0)\n",
    False: "seglock: error: device 'cuda:7' asked for but CUDA is not available\n",
}


@pytest.fixture(autouse=True)
def _serve_env(monkeypatch):
    """`seglock serve` writes its flags to SEGLOCK_* variables: give them back after each test."""
    for name in ("SEGLOCK_HOME", "SEGLOCK_DEVICE", "SEGLOCK_IMPORT_DEMO"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _refusals(tmp_path, capsys):
    """What `seglock serve` and `seglock train` say to --device cuda:7 (both stop before any work)."""
    said = []
    for argv in (["serve", "--home", str(tmp_path / "home"), "--device", "cuda:7", "--no-demo"],
                 ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--device", "cuda:7"]):
        assert main(argv) == 2
        said.append(capsys.readouterr().err)
    return said


def test_server_and_training_refuse_a_missing_gpu_index_alike(one_gpu, tmp_path, capsys):
    assert _refusals(tmp_path, capsys) == [MISSING[True]] * 2
    assert not (tmp_path / "home").exists() and not (tmp_path / "m").exists()


def test_server_and_training_refuse_cuda_alike_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _refusals(tmp_path, capsys) == [MISSING[False]] * 2
