"""Shared test setup: small, deterministic, and fast on 2 CPU cores."""

import os

import pytest

# Two cores: keep torch from oversubscribing when pytest runs several heavy tests.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Servers the tests start measure their backends but never compile (minutes of CPU on 2 cores);
# tests/test_backends.py compiles on purpose.
os.environ.setdefault("SEGLOCK_COMPILE_BUDGET_S", "0")


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # the SDK's no-torch tests run without it
        yield
        return
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (a runner then times by the thread's CPU clock; a reference
    training run is reproducible bit for bit); the count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
