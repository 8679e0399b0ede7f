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
